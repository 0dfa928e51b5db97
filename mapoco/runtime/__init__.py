"""Runtime: connecting to Ray, where every actor is placed, and which dtype each part computes in."""
