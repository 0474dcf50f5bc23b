"""Every launcher under experiments/ ends bad input the same way.

One `error: ...` line last on stderr, exit status 2, no traceback, nothing
written (experiments/_cli.py). Each launcher gets a bad flag, a path that
does not exist and an output directory that cannot be made. And --help
lists the flags a launcher takes from experiments/_cli.py too.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from experiments import _cli
from sact_jax import checkpoint
from sact_jax import models
import testing_utils as tu
import tradeoff_test  # Same directory: its finished-run writer.

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = '--config=sact_jax/configs/default.py'
_DETECTION = '--config=sact_jax/configs/detection.py:sact,smoke'
_CONVERT = ('--family=cifar', '--units=2,2,2', '--model_type=sact',
            '--num_classes=10')

# {tmp}: a fresh directory; {ckpt}: a model checkpoint in it, {damaged} a
# damaged copy; {file}: a regular file in it (a directory below it cannot
# be made, even by root).
# Each case: launcher, arguments, a part of the error line.
_CASES = (
    ('train_bad_flag', 'train', [_CONFIG, '--workdir={tmp}/w', '--nope=1'],
     "Unknown command line flag 'nope'"),
    ('train_bad_config_field', 'train',
     [_CONFIG, '--config.tua=1', '--workdir={tmp}/w'],
     "Unknown config field 'tua'"),
    ('train_unknown_remat', 'train',
     [_CONFIG, '--config.remat=all', '--workdir={tmp}/w'],
     "remat must be None, True, False or 'convs', got 'all'."),
    ('train_uncreatable_workdir', 'train', [_CONFIG, '--workdir=/proc/nope'],
     'Cannot create or write to the directory /proc/nope: '),
    ('train_workdir_below_a_file', 'train', [_CONFIG, '--workdir={file}/w'],
     'Cannot create or write to the directory {file}/w: Not a directory.'),
    ('train_infinite_tau', 'train',
     [_CONFIG, '--config.tau=inf', '--workdir={tmp}/w'],
     'tau must be finite, got inf.'),
    ('train_negative_seed', 'train',
     [_CONFIG, '--config.seed=-1', '--workdir={tmp}/w'],
     'seed must be an integer >= 0, got -1.'),
    ('train_empty_workdir', 'train', [_CONFIG, '--workdir='],
     'workdir is an empty path.'),
    ('train_misspelt_field', 'train',
     [_CONFIG, '--config.num_eval_exampels=1', '--workdir={tmp}/w'],
     "Unknown config field 'num_eval_exampels': overrides can only set "
     'fields that the config file defines. Did you mean "num_eval_examples"'),
    ('train_dataset_not_prepared', 'train',
     ['--config=sact_jax/configs/cifar10.py:sact_20',
      '--config.data_dir={tmp}/data', '--workdir={tmp}/w'],
     "Dataset 'cifar10' is not prepared in {tmp}/data/cifar10/"),
    ('train_units_not_a_depth', 'train',
     [_CONFIG, '--config.units=3', '--workdir={tmp}/w'],
     'units=3 is not a known cifar depth (20, 32, 56, 110); give units per '
     'block, e.g. (3, 3, 3).'),
    ('evaluate_bad_flag', 'evaluate',
     [_CONFIG, '--checkpoint={ckpt}', '--inference=tiles'],
     'flag --inference=tiles'),
    ('evaluate_both_sources', 'evaluate',
     [_CONFIG, '--checkpoint={ckpt}', '--workdir={tmp}'],
     'Give exactly one of --workdir'),
    ('evaluate_missing_checkpoint', 'evaluate',
     [_CONFIG, '--checkpoint={tmp}/missing'],
     'No model checkpoint at {tmp}/missing'),
    ('evaluate_unwritable_output', 'evaluate',
     [_CONFIG, '--checkpoint={ckpt}', '--output={file}/eval.json'],
     'directory {file}: it exists and is not a directory.'),
    ('evaluate_workdir_without_config_json', 'evaluate',
     ['--workdir={tmp}/runs'],
     '{tmp}/runs has no config.json: give the --config of its training '
     'run.'),
    ('evaluate_damaged_checkpoint', 'evaluate',
     [_CONFIG, '--checkpoint={damaged}'],
     'Cannot read the model checkpoint {damaged}, damaged or incomplete?'),
    ('evaluate_zero_batch', 'evaluate',
     [_CONFIG, '--checkpoint={ckpt}', '--config.eval_batch_size=0'],
     'eval_batch_size must be a positive integer, got 0.'),
    ('evaluate_output_is_a_directory', 'evaluate',
     [_CONFIG, '--checkpoint={ckpt}', '--output={tmp}'],
     'The output path {tmp} is a directory; give a file name.'),
    ('export_more_images_than_the_split', 'export_ponder_maps',
     [_CONFIG, '--checkpoint={ckpt}', '--num_images=100000'],
     '--num_images: 100000 images asked for, but the test split of '
     'sact_shapes has 2000.'),
    ('saliency_negative_seed', 'saliency',
     [_CONFIG, '--checkpoint={ckpt}', '--seed=-1'], 'flag --seed=-1'),
    ('saliency_vanilla_model', 'saliency',
     [_CONFIG, '--checkpoint={ckpt}', '--num_images=8'],
     'A vanilla model has no ponder maps to score'),
    ('export_bad_flag', 'export_ponder_maps',
     ['--checkpoint={ckpt}', '--photos', '--num_images=-1'],
     'flag --num_images=-1'),
    ('export_missing_checkpoint', 'export_ponder_maps',
     ['--checkpoint={tmp}/missing', '--photos'],
     'No model checkpoint at {tmp}/missing'),
    ('export_vanilla_model', 'export_ponder_maps',
     ['--checkpoint={ckpt}', '--photos'],
     'A vanilla model has no ponder maps to draw'),
    ('export_unwritable_out_dir', 'export_ponder_maps',
     ['--checkpoint={sact_ckpt}', '--photos', '--out_dir={file}/maps'],
     'directory {file}/maps: Not a directory.'),
    ('export_images_match_nothing', 'export_ponder_maps',
     ['--checkpoint={ckpt}', '--images={tmp}/*.jpg'],
     '--images={tmp}/*.jpg matches no file.'),
    ('export_only_non_images', 'export_ponder_maps',
     ['--checkpoint={sact_ckpt}', '--images={file}', '--out_dir={tmp}/maps'],
     'None of the 1 files matched is an image'),
    ('export_npz_suffix', 'export_ponder_maps',
     ['--checkpoint={ckpt}', '--images={file}', '--export={tmp}/maps.txt'],
     'must end in .npz.'),
    ('sweep_taus_not_numbers', 'sweep', ['--workdir={tmp}/s', '--taus=abc'],
     '--taus must be numbers, got abc.'),
    ('sweep_unknown_model_type', 'sweep',
     ['--workdir={tmp}/s', '--model_types=vanilla'],
     "Unknown model types ['vanilla']"),
    ('sweep_bad_vanilla_units', 'sweep',
     ['--workdir={tmp}/s', '--vanilla_units=1-2'],
     "Bad vanilla units '1-2': the model has 3 blocks"),
    ('sweep_bad_config_field', 'sweep',
     ['--workdir={tmp}/s', '--config.eps=2.0'],
     'Run sact_tau0.01: eps must lie in (0, 1), got 2.0.'),
    ('sweep_root_below_a_file', 'sweep', ['--workdir={file}/s'],
     'Cannot create or write to the directory {file}/s: Not a directory.'),
    ('collect_missing_path', 'collect_sweep', ['--workdirs={tmp}/missing'],
     'No such file or directory: {tmp}/missing'),
    ('collect_no_finished_runs', 'collect_sweep', ['--workdirs={tmp}'],
     'No finished runs (workdirs with eval.json) in {tmp}.'),
    ('collect_glob_without_output_dir', 'collect_sweep',
     ['--workdirs={tmp}/runs/*'],
     'Give --output_dir: the first --workdirs entry ({tmp}/runs/*) is not '
     'a directory to write into.'),
    ('sweep_infinite_tau', 'sweep', ['--workdir={tmp}/s', '--taus=inf'],
     'Run sact_tauinf: tau must be finite, got inf.'),
    ('train_detection_bad_config_field', 'train_detection',
     [_DETECTION, '--config.detector.crop_size=7', '--workdir={tmp}/w'],
     'crop_size must be even'),
    ('train_detection_cifar_backbone', 'train_detection',
     [_DETECTION, '--config.family=cifar', '--config.units=(1,1,1)',
      '--workdir={tmp}/w'],
     'A detector needs an ImageNet-family backbone'),
    ('train_detection_unknown_dataset', 'train_detection',
     [_DETECTION, '--config.dataset=voc', '--workdir={tmp}/w'],
     "Unknown detection dataset 'voc'"),
    ('train_detection_missing_init_from', 'train_detection',
     [_DETECTION, '--config.init_from={tmp}/missing', '--workdir={tmp}/w'],
     'is neither a sact_jax model checkpoint nor a training workdir'),
    ('train_detection_uncreatable_workdir', 'train_detection',
     [_DETECTION, '--workdir={file}/w'],
     'Cannot create or write to the directory {file}/w: Not a directory.'),
    ('evaluate_detection_no_checkpoint', 'evaluate_detection',
     [_DETECTION, '--workdir={tmp}'], 'No training checkpoint in {tmp}'),
    ('evaluate_detection_bad_flag', 'evaluate_detection',
     [_DETECTION, '--workdir={tmp}', '--pictures=-1'], 'flag --pictures=-1'),
    ('collect_detection_unfinished', 'collect_detection',
     ['--workdirs={tmp}'], 'Not a finished detection run:'),
    ('train_detection_negative_pictures', 'train_detection',
     [_DETECTION, '--config.num_detection_pictures=-1', '--workdir={tmp}/w'],
     'num_detection_pictures must be an integer >= 0, got -1.'),
    ('train_detection_zero_max_boxes', 'train_detection',
     [_DETECTION, '--config.max_boxes=0', '--workdir={tmp}/w'],
     "max_boxes must be None (the dataset's) or an integer >= 1, got 0."),
    ('train_detection_zero_image_size', 'train_detection',
     [_DETECTION, '--config.image_size=0', '--workdir={tmp}/w'],
     "image_size must be None (the dataset's) or an integer >= 1, got 0."),
    ('train_detection_image_size_the_data_lacks', 'train_detection',
     [_DETECTION, '--config.image_size=48', '--workdir={tmp}/w'],
     'image_size=48 does not match sact_detection/tiny, whose images are '
     '64x64'),
    ('train_detection_no_anchor_scales', 'train_detection',
     [_DETECTION, '--config.detector.anchor_scales=()', '--workdir={tmp}/w'],
     'anchor_scales must be a non-empty sequence of numbers > 0, got ().'),
    ('train_detection_zero_anchor_base_size', 'train_detection',
     [_DETECTION, '--config.detector.anchor_base_size=0',
      '--workdir={tmp}/w'],
     'anchor_base_size must be > 0, got 0'),
    ('train_detection_more_eval_examples_than_the_split', 'train_detection',
     [_DETECTION, '--config.num_eval_examples=1000', '--workdir={tmp}/w'],
     'num_eval_examples=1000 is more than the 32 images of the test split '
     'of sact_detection/tiny.'),
    ('train_detection_more_pictures_than_the_split', 'train_detection',
     [_DETECTION, '--config.num_detection_pictures=100', '--workdir={tmp}/w'],
     'num_detection_pictures: 100 images asked for, but the test split of '
     'sact_detection/tiny has 32.'),
    ('train_detection_init_from_another_architecture', 'train_detection',
     [_DETECTION, '--config.init_from={ckpt}', '--workdir={tmp}/w'],
     "init_from='{ckpt}': Cannot restore the source model into the model"),
    ('train_detection_init_from_damaged', 'train_detection',
     [_DETECTION, '--config.init_from={damaged}', '--workdir={tmp}/w'],
     "init_from='{damaged}': Cannot read the model checkpoint {damaged}, "
     'damaged or incomplete?'),
    ('train_detection_dataset_not_prepared', 'train_detection',
     ['--config=sact_jax/configs/coco_detection.py:sact',
      '--config.init_from={ckpt}', '--config.data_dir={tmp}',
      '--workdir={tmp}/w'],
     "Dataset 'coco' is not prepared in {tmp}/coco/2017"),
    ('train_detection_unusable_data_dir', 'train_detection',
     [_DETECTION, '--config.data_dir=/proc/nope', '--workdir={tmp}/w'],
     "data_dir='/proc/nope' cannot be used for sact_detection/tiny: "),
    ('train_detection_unexpected_arguments', 'train_detection',
     [_DETECTION, '--workdir={tmp}/w', 'extra', 'more'],
     'Unexpected arguments: extra more'),
    ('evaluate_detection_workdir_without_config_json', 'evaluate_detection',
     ['--workdir={tmp}'],
     '{tmp} has no config.json: give the --config of its training run.'),
    ('evaluate_detection_classification_run', 'evaluate_detection',
     ['--workdir={tmp}/runs/sact'],
     "Unknown detection dataset 'sact_shapes'; supported: sact_detection"),
    ('evaluate_detection_more_pictures_than_the_split', 'evaluate_detection',
     [_DETECTION, '--workdir={tmp}', '--pictures=100'],
     '--pictures: 100 images asked for, but the test split of '
     'sact_detection/tiny has 32.'),
    ('evaluate_detection_more_eval_examples_than_the_split',
     'evaluate_detection',
     [_DETECTION, '--workdir={tmp}', '--config.num_eval_examples=1000'],
     'num_eval_examples=1000 is more than the 32 images'),
    ('evaluate_detection_zero_max_boxes', 'evaluate_detection',
     [_DETECTION, '--workdir={tmp}', '--config.max_boxes=0'],
     "max_boxes must be None (the dataset's) or an integer >= 1, got 0."),
    ('evaluate_detection_empty_output', 'evaluate_detection',
     [_DETECTION, '--workdir={tmp}', '--output='],
     '--output is an empty path'),
    ('collect_detection_not_a_directory', 'collect_detection',
     ['--workdirs={file}'],
     'Not a finished detection run: {file} is not a directory.'),
    ('collect_detection_no_workdirs', 'collect_detection', ['--workdirs='],
     '--workdirs is empty'),
    ('convert_bad_flag', 'convert_checkpoint',
     ['--tf_checkpoint={tmp}', *_CONVERT[1:], '--family=mnist',
      '--output={tmp}/out'],
     'flag --family=mnist'),
    ('convert_missing_tf_checkpoint', 'convert_checkpoint',
     ['--tf_checkpoint={tmp}/missing', *_CONVERT, '--output={tmp}/new/out'],
     'No TF checkpoint at {tmp}/missing'),
    ('train_multihost_off_cluster', 'train',
     [_CONFIG, '--workdir={tmp}/w', '--multihost'],
     'jax.distributed.initialize failed: coordinator_address should be '
     'defined. (--multihost needs a cluster jax detects'),
    ('train_process_id_out_of_range', 'train',
     [_CONFIG, '--workdir={tmp}/w', '--coordinator_address=localhost:12345',
      '--num_processes=2', '--process_id=5'],
     '--process_id=5 must lie in [0, 2) with --num_processes=2.'),
    ('train_processes_without_coordinator', 'train',
     [_CONFIG, '--workdir={tmp}/w', '--num_processes=2', '--process_id=1'],
     '--num_processes and --process_id need --coordinator_address'),
    ('train_coordinator_without_processes', 'train',
     [_CONFIG, '--workdir={tmp}/w', '--coordinator_address=localhost:12345'],
     'jax.distributed.initialize failed: Number of processes must be '
     'defined. (outside a cluster jax detects, give --num_processes and '
     '--process_id too)'),
    ('train_detection_process_id_without_coordinator', 'train_detection',
     [_DETECTION, '--workdir={tmp}/w', '--process_id=0'],
     '--num_processes and --process_id need --coordinator_address'),
    ('train_detection_multihost_off_cluster', 'train_detection',
     [_DETECTION, '--workdir={tmp}/w', '--multihost'],
     'jax.distributed.initialize failed: coordinator_address should be '
     'defined.'),
    ('sweep_variant_of_a_config_without_variants', 'sweep',
     ['--config=sact_jax/configs/sweep.py:smoke', '--workdir={tmp}/s'],
     "--config=sact_jax/configs/sweep.py:smoke: sact_jax/configs/sweep.py "
     "has no variants; give --config=sact_jax/configs/sweep.py without "
     "':smoke'."),
    # The command to run is in the middle of a multi-line message; the
    # --out_dir and --output directories made before the dataset is read
    # are removed again.
    ('export_dataset_not_prepared', 'export_ponder_maps',
     ['--config=sact_jax/configs/cifar10.py', '--config.data_dir={tmp}/data',
      '--checkpoint={sact_ckpt}', '--out_dir={tmp}/maps_new/maps'],
     'Prepare it on a machine with network access and TensorFlow (`pip '
     'install tensorflow tensorflow-datasets`): tfds build cifar10 '
     '--data_dir=DATA_DIR --file_format=array_record then copy '
     'DATA_DIR/cifar10 into the data_dir above.'),
    ('saliency_dataset_not_prepared', 'saliency',
     ['--config=sact_jax/configs/cifar10.py', '--config.data_dir={tmp}/data',
      '--checkpoint={sact_ckpt}', '--output={tmp}/scores_new/s.json'],
     'tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record'),
    ('export_unwritable_npz_after_out_dir', 'export_ponder_maps',
     ['--checkpoint={sact_ckpt}', '--photos', '--out_dir={tmp}/npz_new/maps',
      '--export={file}/maps.npz'],
     'directory {file}: it exists and is not a directory.'),
)

# Each case: launcher, flags its --help must list (those defined in
# experiments/_cli.py among them).
# The launchers that compile, each with a --compilation_cache_dir.
_CACHED = ('train', 'sweep', 'train_detection', 'evaluate', 'saliency',
           'evaluate_detection', 'export_ponder_maps')

_HELP_CASES = (
    ('evaluate', 'evaluate',
     ['config', 'workdir', 'checkpoint', 'compilation_cache_dir', 'output']),
    ('export_ponder_maps', 'export_ponder_maps',
     ['config', 'workdir', 'checkpoint', 'out_dir', 'compilation_cache_dir']),
    ('saliency', 'saliency',
     ['config', 'workdir', 'checkpoint', 'output', 'compilation_cache_dir']),
    ('evaluate_detection', 'evaluate_detection',
     ['config', 'workdir', 'output', 'pictures', 'compilation_cache_dir']),
    ('train', 'train',
     ['config', 'workdir', 'compilation_cache_dir', 'multihost',
      'coordinator_address', 'num_processes', 'process_id']),
    ('train_detection', 'train_detection',
     ['config', 'workdir', 'compilation_cache_dir', 'multihost',
      'coordinator_address', 'num_processes', 'process_id']),
    ('sweep', 'sweep', ['config', 'workdir', 'compilation_cache_dir']),
)

# Environment variables by which jax would take the test host for a cluster
# (`--multihost` would then start a run).
_CLUSTER_VARIABLES = ('SLURM_', 'OMPI_', 'PMI_', 'KUBERNETES_SERVICE_HOST')


class LauncherConventionTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.ckpt = os.path.join(cls.tmp, 'ckpt')
    spec = models.ModelSpec('cifar', (1, 1, 1), 'vanilla', num_classes=6,
                            base_channels=4)
    model = tu.build('cifar', spec.units, 'vanilla', num_classes=6,
                     base_channels=4)
    checkpoint.save_model(cls.ckpt, model, spec)
    cls.sact_ckpt = os.path.join(cls.tmp, 'sact_ckpt')
    spec = dataclasses.replace(spec, model_type='sact')
    checkpoint.save_model(cls.sact_ckpt, tu.build(
        'cifar', spec.units, 'sact', num_classes=6, base_channels=4), spec)
    tradeoff_test.write_run(os.path.join(cls.tmp, 'runs'), 'sact',
                            model_type='sact', units=(1, 1, 1), top1=0.9,
                            flops=1e6)
    # The model checkpoint with its arrays' data files deleted.
    cls.damaged = os.path.join(cls.tmp, 'damaged')
    shutil.copytree(cls.ckpt, cls.damaged)
    shutil.rmtree(os.path.join(cls.damaged, checkpoint.STATE_DIR,
                               'ocdbt.process_0'))
    cls.file = os.path.join(cls.tmp, 'file')
    with open(cls.file, 'w') as f:
      f.write('not a directory')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _listing(self) -> list[tuple[str, list[str], list[str]]]:
    return sorted((os.path.relpath(root, self.tmp), sorted(dirs),
                   sorted(files)) for root, dirs, files in os.walk(self.tmp))

  def _launch(self, launcher: str, args: list[str], cwd: str = _REPO
              ) -> subprocess.CompletedProcess[str]:
    # The CPU on any host: a GPU is held by this test process, and the
    # convention does not depend on the backend.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_CLUSTER_VARIABLES)}
    env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONPATH=os.pathsep.join(
                   filter(None, [_REPO, env.get('PYTHONPATH')])))
    return subprocess.run(
        [sys.executable, '-m', f'experiments.{launcher}', *args,
         *(['--compilation_cache_dir='] if launcher in _CACHED else [])],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        check=False)

  def _assert_bad_input(self, launcher: str, args: list[str], message: str,
                        cwd: str = _REPO):
    paths = dict(tmp=self.tmp, ckpt=self.ckpt, sact_ckpt=self.sact_ckpt,
                 file=self.file, damaged=self.damaged)
    args = [a.format(**paths) for a in args]
    before = self._listing()
    proc = self._launch(launcher, args, cwd=cwd)
    lines = proc.stderr.strip().splitlines()
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertNotEmpty(lines)
    self.assertStartsWith(lines[-1], 'error: ')
    self.assertIn(message.format(**paths), lines[-1])
    self.assertLen([l for l in lines if l.startswith('error: ')], 1,
                   proc.stderr[-3000:])
    self.assertNotIn('Traceback', proc.stderr)
    self.assertEqual(self._listing(), before)  # Nothing written.

  @parameterized.named_parameters(*_CASES)
  def test_bad_input_is_one_error_line_and_status_2(self, launcher, args,
                                                     message):
    self._assert_bad_input(launcher, args, message)

  def test_sweep_default_config_from_another_directory(self):
    # The default --config loads (the --taus check comes after it) though
    # the working directory has no sact_jax/configs/sweep.py.
    self._assert_bad_input('sweep', ['--workdir={tmp}/s', '--taus=abc'],
                           '--taus must be numbers, got abc.', cwd=self.tmp)

  @parameterized.named_parameters(*_HELP_CASES)
  def test_help_lists_the_flags_it_accepts(self, launcher, names):
    help_text = self._launch(launcher, ['--help']).stdout
    for name in names:
      self.assertRegex(help_text, rf'(?m)^\s+--(\[no\])?{name}:',
                       f'--{name} missing from --help of {launcher}')


class OneLineTest(absltest.TestCase):

  def test_keeps_every_line(self):
    error = ValueError('Dataset is not prepared.\nPrepare it with:\n'
                       '  tfds build cifar10 --data_dir=DATA_DIR\nthen copy.')
    self.assertEqual(_cli.one_line(error),
                     'Dataset is not prepared. Prepare it with: tfds build '
                     'cifar10 --data_dir=DATA_DIR then copy.')

  def test_cuts_an_embedded_traceback_to_its_exception(self):
    error = ValueError('Error whilst parsing config file:\n\n'
                       'Traceback (most recent call last):\n'
                       '  File "config.py", line 1, in get_config\n'
                       '    raise ValueError(\'bad\')\n'
                       'ValueError: bad\n')
    self.assertEqual(_cli.one_line(error),
                     'Error whilst parsing config file: ValueError: bad')

  def test_cuts_a_long_message_in_the_middle(self):
    line = _cli.one_line(RuntimeError('start ' + 'x' * 10_000 + ' end'))
    self.assertLessEqual(len(line), 1510)
    self.assertStartsWith(line, 'start ')
    self.assertEndsWith(line, ' end')
    self.assertIn(' [...] ', line)


if __name__ == '__main__':
  absltest.main()
