"""Flow++ variational dequantizer (score_flow), in flax.linen. See utils.py for the API and the
sign convention of the log-determinant."""
from .dequantization import VARIANTS, Dequantization, FlowppVariant, get_variant
from .utils import (get_dequantizer, get_inverse_dequantizer, get_model, init_dequantizer,
                    init_params, log_q, neg_log_q, std_normal_logpdf)
