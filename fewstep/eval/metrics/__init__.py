"""Distribution metrics as torchmetrics ``Metric``s and small functions over features."""
