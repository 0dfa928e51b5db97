"""The model zoo: specs (what each tiny model is), registry (where models live, how they load), build (how
they are made)."""
