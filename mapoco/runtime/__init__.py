"""Runtime: connecting to Ray, where every actor is placed, which dtype each part computes in, how weights move
between learners and engines, and where actor output goes."""
