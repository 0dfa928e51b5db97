"""Serving: a trained team or conductor behind an OpenAI-compatible endpoint (Ray Serve), and the discussion as an
RLlib environment."""
