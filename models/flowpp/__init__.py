"""Flow++ variational dequantizer (score_flow), in flax.linen. See utils.py for the API and the
sign convention of the log-determinant."""
from .dequantization import AUTO, VARIANTS, Dequantization, FlowppVariant, auto_variant, get_variant
from .utils import (get_dequantizer, get_inverse_dequantizer, get_model, init_dequantizer,
                    init_params, log_q, model_name, neg_log_q, std_normal_logpdf)

__all__ = ['AUTO', 'VARIANTS', 'Dequantization', 'FlowppVariant', 'auto_variant', 'get_variant',
           'get_dequantizer', 'get_inverse_dequantizer', 'get_model', 'init_dequantizer',
           'init_params', 'log_q', 'model_name', 'neg_log_q', 'std_normal_logpdf']
