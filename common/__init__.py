"""Small utilities shared by the CleanCRS method scripts. A module imports another where it builds on it (data on
formats, checkpoints on distributed, run on tracking, llm and distributed); none imports a script."""
