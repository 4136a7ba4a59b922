"""eval_files: the settings that stored results are checked against."""
import eval_files
from configs.tiny.patterns_ddpmpp import get_config


def test_settings_of_old_eval_folders_unchanged():
  settings = eval_files.result_settings(get_config())
  assert settings['eval']['dequantizer'] is False and 'num_deq_samples' not in settings['eval']
  config = get_config()
  config.eval.num_deq_samples = 4
  assert eval_files.result_settings(config)['eval']['num_deq_samples'] == 4
