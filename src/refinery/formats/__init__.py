"""The files stages hand each other: one small module per format, read and written here."""
