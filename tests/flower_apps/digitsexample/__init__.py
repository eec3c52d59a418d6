"""digitsexample: a Flower / PyTorch app on 8x8 digit images."""
