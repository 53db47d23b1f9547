"""The family layer's error, shared by the families and their noise processes."""


class UnsupportedModelError(ValueError):
    """A model this family cannot run (e.g. an SDXL refiner's aesthetic-score conditioning)."""
