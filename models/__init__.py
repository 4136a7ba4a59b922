"""Score networks. Importing the package registers 'ncsnpp', 'ddpm' and 'mlp' with models.utils."""
from models import utils  # noqa: F401  (the registry first)
from models import layers, layerspp, normalization, up_or_down_sampling  # noqa: F401
from models import ddpm, mlp, ncsnpp  # noqa: F401
