"""Model evaluation: accuracy and calibration metrics, robustness under fixed
corruptions, CPU/GPU cost, and the per-model report and comparison table.

Every function works from a prediction callable or its outputs, so the fp32
teacher, the fp32 student and the int8 student (an ``ExportedProgram``) are
measured the same way.
"""
