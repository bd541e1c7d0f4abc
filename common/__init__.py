"""Small utilities shared by the CleanCRS method scripts. Each module stands alone."""
