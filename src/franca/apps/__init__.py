"""Applications built from every lower layer of franca: the demo and the training monitors (k-NN during training)."""
