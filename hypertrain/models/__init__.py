"""Models: the frozen main T5 with per-example PEFT parameters, and the hypernetworks that write them."""
