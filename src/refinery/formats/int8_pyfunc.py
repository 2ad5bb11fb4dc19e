"""MLflow "model from code" for the int8 student: saved *with* the model, not imported.

MLflow copies this file into the logged model and runs it at load time, so a
registered ``models:/<name>@champion`` loads with only torch and mlflow
installed: no refinery, no torchao. It exists because MLflow's PyTorch flavor
calls ``torch.export.load`` before anything registers the quantized q/dq
operators the int8 graph uses.

Input: float32 images in [0, 1], shape (N, C, H, W). Output: class
probabilities, shape (N, classes).
"""

import mlflow
import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed q/dq ops
from mlflow.pyfunc import PythonModel


class Int8ImageClassifier(PythonModel):
    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.module = torch.export.load(context.artifacts["program"]).module()

    # Typed: MLflow checks the input against the signature logged from the input example
    # (float32, (-1, C, H, W)) instead of warning at load that it cannot validate.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return torch.softmax(self.module(images), dim=1).numpy()


mlflow.models.set_model(Int8ImageClassifier())
