"""prcore: subject personalization with DCO LoRAs and parallel-rescaled consistency guidance."""

__version__ = "0.1.0"
