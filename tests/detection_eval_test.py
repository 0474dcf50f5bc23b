"""COCO metrics and detection pictures of sact_jax/detection."""

import json
import math
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from sact_jax.detection import coco_eval
from sact_jax.detection import evaluate as evaluate_lib
from sact_jax.detection import visualize
import train_helpers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NAMES = ('cat', 'dog', 'bird')


def _pad(rows, dtype, fill):
  """Lists of per-image rows as one `[N, max(len), ...]` array, padded."""
  size = max([len(r) for r in rows] + [0])
  out = np.full((len(rows), size) + np.shape(fill), fill, np.float64)
  for i, r in enumerate(rows):
    if r:
      out[i, :len(r)] = r
  return out if dtype is None else out.astype(dtype)


def _ground_truth(images, crowd=None):
  """images: per image a list of (box, label)."""
  truth = {'image_id': np.arange(len(images)) + 7,
           'boxes': _pad([[b for b, _ in im] for im in images], None,
                         np.zeros(4)),
           'labels': _pad([[c for _, c in im] for im in images], np.int32,
                          -1)}
  if crowd is not None:
    truth['crowd'] = _pad(crowd, bool, False)
  return truth


def _detections(images):
  """images: per image a list of (box, class, score)."""
  return {'boxes': _pad([[b for b, _, _ in im] for im in images], None,
                        np.zeros(4)),
          'classes': _pad([[c for _, c, _ in im] for im in images],
                          np.int32, 0),
          'scores': _pad([[s for _, _, s in im] for im in images], None,
                         0.0),
          'valid': _pad([[True] * len(im) for im in images], bool, False)}


def _metrics(truth, dets, num_classes=3):
  return coco_eval.coco_metrics(truth, dets, num_classes=num_classes,
                                class_names=_NAMES[:num_classes])


# Boxes (ymin, xmin, ymax, xmax) of COCO's three sizes (area < 32^2,
# < 96^2, larger), away from the boundaries.
_SMALL = (10.0, 10.0, 30.0, 25.0)      # 20 x 15 = 300.
_MEDIUM = (50.0, 40.0, 110.0, 120.0)   # 60 x 80 = 4800.
_LARGE = (100.0, 150.0, 300.0, 350.0)  # 200 x 200.
_BOX = (0.0, 0.0, 100.0, 100.0)


def _shift(box, dx):
  ymin, xmin, ymax, xmax = box
  return (ymin, xmin + dx, ymax, xmax + dx)


class CocoMetricsTest(parameterized.TestCase):

  def test_perfect_detections(self):
    images = [[(_SMALL, 0), (_LARGE, 1)], [(_MEDIUM, 2)],
              [(_MEDIUM, 0), (_SMALL, 0), (_LARGE, 2)]]
    dets = [[(b, c, 0.9 - 0.1 * j) for j, (b, c) in enumerate(im)]
            for im in images]
    metrics = _metrics(_ground_truth(images), _detections(dets))
    for key in ('mAP', 'mAP@0.5', 'mAP@0.75', 'mAP_small', 'mAP_medium',
                'mAP_large', 'AR@10', 'AR@100', 'AP/cat', 'AP/dog',
                'AP/bird'):
      self.assertAlmostEqual(metrics[key], 1.0, places=6, msg=key)
    # COCO's maxDets count per image and class: at 1, image 2 finds one of
    # its two cats; cat recall 2/3, the others 1.
    self.assertAlmostEqual(metrics['AR@1'], (2 / 3 + 1 + 1) / 3, places=6)
    self.assertCountEqual(
        metrics, list(coco_eval.SUMMARY_KEYS) + [f'AP/{n}' for n in _NAMES])

  def test_iou_two_thirds(self):
    # Shifted by 20 of 100: IoU 80 / 120 = 2/3, a hit at thresholds 0.5,
    # 0.55, 0.6 and 0.65: 4 of the 10 of AP@[.5:.95].
    truth = _ground_truth([[(_BOX, 0)], [(_LARGE, 1)]])
    dets = _detections([[(_shift(_BOX, 20.0), 0, 0.9)],
                        [(_shift(_LARGE, 40.0), 1, 0.8)]])
    metrics = _metrics(truth, dets)
    self.assertAlmostEqual(metrics['mAP@0.5'], 1.0, places=6)
    self.assertAlmostEqual(metrics['mAP@0.75'], 0.0, places=6)
    self.assertAlmostEqual(metrics['mAP'], 0.4, places=6)

  def test_false_positive_above_a_true_positive(self):
    # Two cats; detections by score: hit, miss (nowhere near), hit.
    # Recall 1/2, 1/2, 1 at precision 1, 1/2, 2/3; interpolated (max to the
    # right) 1, 2/3, 2/3. Of COCO's 101 recall thresholds 0, .01, ..., 1,
    # the 51 up to 0.5 read precision 1 and the 50 above it 2/3:
    # AP = (51 + 50 * 2/3) / 101 = 253 / 303, at every IoU threshold.
    far = (400.0, 400.0, 450.0, 450.0)
    truth = _ground_truth([[(_BOX, 0), (_LARGE, 0)]])
    without = _metrics(truth, _detections([[(_BOX, 0, 0.95),
                                            (_LARGE, 0, 0.8)]]))
    self.assertAlmostEqual(without['mAP'], 1.0, places=6)
    metrics = _metrics(truth, _detections([[(_BOX, 0, 0.95), (far, 0, 0.9),
                                            (_LARGE, 0, 0.8)]]))
    self.assertAlmostEqual(metrics['mAP'], 253 / 303, places=6)
    self.assertAlmostEqual(metrics['AP/cat'], 253 / 303, places=6)
    self.assertAlmostEqual(metrics['AR@100'], 1.0, places=6)

  def test_wrong_class(self):
    truth = _ground_truth([[(_BOX, 0), (_LARGE, 1)]])
    metrics = _metrics(truth, _detections([[(_BOX, 0, 0.9),
                                            (_LARGE, 2, 0.9)]]))
    self.assertAlmostEqual(metrics['AP/cat'], 1.0, places=6)
    self.assertAlmostEqual(metrics['AP/dog'], 0.0, places=6)
    self.assertTrue(math.isnan(metrics['AP/bird']))  # No bird to find.
    self.assertAlmostEqual(metrics['mAP'], 0.5, places=6)

  def test_no_detections(self):
    truth = _ground_truth([[(_BOX, 0)], [(_MEDIUM, 1)]])
    for dets in (_detections([[], []]),  # K = 0.
                 {**_detections([[(_BOX, 0, 0.9)], [(_MEDIUM, 1, 0.9)]]),
                  'valid': np.zeros((2, 1), bool)}):  # None valid.
      metrics = _metrics(truth, dets)
      for key in ('mAP', 'mAP@0.5', 'AR@100', 'AP/cat', 'AP/dog'):
        self.assertEqual(metrics[key], 0.0, msg=key)
      self.assertTrue(math.isnan(metrics['mAP_small']))  # No small boxes.

  def test_images_without_ground_truth(self):
    truth = _ground_truth([[(_BOX, 0)], []])
    perfect = _metrics(truth, _detections([[(_BOX, 0, 0.8)], []]))
    self.assertAlmostEqual(perfect['mAP'], 1.0, places=6)
    # A better-scored cat in the empty image: a false positive first.
    metrics = _metrics(truth, _detections([[(_BOX, 0, 0.8)],
                                           [(_BOX, 0, 0.9)]]))
    self.assertAlmostEqual(metrics['mAP'], 0.5, places=6)
    # No ground truth anywhere: nothing to average, NaN rather than a score.
    empty = _metrics(_ground_truth([[], []]),
                     _detections([[(_BOX, 0, 0.8)], []]))
    self.assertTrue(math.isnan(empty['mAP']))
    self.assertTrue(math.isnan(empty['AP/cat']))

  def test_crowd_boxes_are_ignored(self):
    crowd_box = (200.0, 200.0, 400.0, 400.0)
    images = [[(_BOX, 0), (crowd_box, 0)]]
    truth = _ground_truth(images, crowd=[[False, True]])
    # The best detection lies on the crowd: neither hit nor false positive.
    dets = _detections([[(crowd_box, 0, 0.95), (_BOX, 0, 0.9)]])
    self.assertAlmostEqual(_metrics(truth, dets)['mAP'], 1.0, places=6)
    # And the crowd unmatched is no miss.
    alone = _detections([[(_BOX, 0, 0.9)]])
    self.assertAlmostEqual(_metrics(truth, alone)['mAP'], 1.0, places=6)
    # Control: without the crowd box, the detection on it is a false
    # positive above the hit (precision 1/2 at full recall).
    no_crowd = _ground_truth([[(_BOX, 0)]])
    self.assertAlmostEqual(_metrics(no_crowd, dets)['mAP'], 0.5, places=6)

  def test_class_indices_name_the_keys_without_names(self):
    truth = _ground_truth([[(_BOX, 1)]])
    metrics = coco_eval.coco_metrics(
        truth, _detections([[(_BOX, 1, 0.9)]]), num_classes=2)
    self.assertAlmostEqual(metrics['AP/1'], 1.0, places=6)
    self.assertTrue(math.isnan(metrics['AP/0']))

  def test_bad_inputs(self):
    truth = _ground_truth([[(_BOX, 0)], [(_MEDIUM, 1)]])
    dets = _detections([[(_BOX, 0, 0.9)], [(_MEDIUM, 1, 0.9)]])
    bad = {
        'no images': ({'image_id': np.zeros((0,), int),
                       'boxes': np.zeros((0, 1, 4)),
                       'labels': np.zeros((0, 1), int)}, dets, 'N = 0'),
        'boxes of 3': ({**truth, 'boxes': truth['boxes'][..., :3]}, dets,
                       r'boxes should have shape \(2, 1, 4\)'),
        'labels': ({**truth, 'labels': truth['labels'][:, :0]}, dets,
                   'labels should have shape'),
        'crowd': ({**truth, 'crowd': np.zeros((2, 3), bool)}, dets,
                  'crowd should have shape'),
        'duplicate ids': ({**truth, 'image_id': np.array([3, 3])}, dets,
                          'duplicates'),
        'label range': ({**truth, 'labels': truth['labels'] + 5}, dets,
                        r'labels must lie in \[-1, 3\)'),
        'missing key': ({k: v for k, v in truth.items() if k != 'labels'},
                        dets, "no 'labels'"),
        'images of detections': (truth, {k: v[:1] for k, v in dets.items()},
                                 'detections boxes should have shape'),
        'scores': (truth, {**dets, 'scores': dets['scores'][:, None]},
                   'detections scores should have shape'),
        'class range': (truth, {**dets, 'classes': dets['classes'] + 3},
                        r'classes in \[0, 3\)'),
        'nan score': (truth, {**dets, 'scores': np.full((2, 1), np.nan)},
                      'non-finite'),
    }
    for name, (t, d, message) in bad.items():
      with self.subTest(name), self.assertRaisesRegex(ValueError, message):
        _metrics(t, d)
    with self.assertRaisesRegex(ValueError, '2 class names for 3'):
      coco_eval.coco_metrics(truth, dets, num_classes=3,
                             class_names=('a', 'b'))

  def test_pixel_boxes(self):
    boxes = np.array([[[0.0, 0.5, 1.0, 1.0]], [[0.25, 0.0, 0.5, 0.5]]])
    np.testing.assert_allclose(coco_eval.pixel_boxes(boxes, 100, 200),
                               [[[0, 100, 100, 200]], [[25, 0, 50, 100]]])
    # One size per image.
    np.testing.assert_allclose(
        coco_eval.pixel_boxes(boxes, np.array([100, 40]),
                              np.array([200, 80])),
        [[[0, 100, 100, 200]], [[10, 0, 20, 40]]])
    with self.assertRaisesRegex(ValueError, 'do not match'):
      coco_eval.pixel_boxes(boxes, np.ones(3), np.ones(3))


def _count(fig, gid):
  return sum(p.get_gid() == gid for ax in fig.axes for p in ax.patches)


class DetectionFigureTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, size=(3, 48, 64, 3), dtype=np.uint8)
    # Scores 0.9, 0.6, 0.3, the last one not valid; per image.
    self.dets = _detections([[(_SMALL, 0, 0.9), (_MEDIUM, 1, 0.6),
                              (_SMALL, 2, 0.3)]] * 3)
    self.dets['valid'][:, 1] = [True, False, True]
    self.truth = _ground_truth([[(_SMALL, 0)], [], [(_MEDIUM, 1)]])

  @parameterized.named_parameters(('with_ponder', True),
                                  ('without_ponder', False))
  def test_axes(self, ponder):
    maps = np.random.default_rng(1).uniform(1, 3, size=(3, 3, 4))
    fig = visualize.detection_figure(
        self.images, self.dets, class_names=_NAMES,
        ponder_maps_Nxhxw=maps if ponder else None)
    # Detections and ponder map per image, and one colorbar.
    self.assertLen(fig.axes, 3 * 2 + 1 if ponder else 3)
    fig.canvas.draw()
    if ponder:
      self.assertIn('mean', fig.axes[1].get_title())
      self.assertIn(f'{maps[0].mean():.2f}', fig.axes[1].get_title())

  @parameterized.parameters((0.5, 2 + 1 + 2), (0.2, 3 + 2 + 3),
                            (0.95, 0))
  def test_rectangles_above_the_threshold(self, threshold, expected):
    fig = visualize.detection_figure(
        self.images, self.dets, class_names=_NAMES,
        ground_truth=self.truth, score_threshold=threshold)
    self.assertEqual(_count(fig, visualize.DETECTION_GID), expected)
    self.assertEqual(_count(fig, visualize.GROUND_TRUTH_GID), 2)
    self.assertEqual(fig.axes[0].get_title(), {
        5: '2 detections', 8: '3 detections', 0: '0 detections'}[expected]
                     + f' (score > {threshold:g}); dashed: ground truth')
    # A 'class score' label per box.
    self.assertLen([t for ax in fig.axes for t in ax.texts], expected)
    if expected:
      self.assertIn('cat 0.90', [t.get_text() for t in fig.axes[0].texts])

  def test_zero_detections_normalised_images_and_max_images(self):
    images = np.random.default_rng(2).normal(size=(10, 40, 30, 3))
    fig = visualize.detection_figure(
        images, _detections([[]] * 10), class_names=None,
        ponder_maps_Nxhxw=np.full((10, 2, 2), 2.0), max_images=4)
    self.assertLen(fig.axes, 4 * 2 + 1)
    self.assertEqual(_count(fig, visualize.DETECTION_GID), 0)
    fig.canvas.draw()

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, r'\[3, h, w\]'):
      visualize.detection_figure(self.images, self.dets, class_names=_NAMES,
                                 ponder_maps_Nxhxw=np.ones((2, 3, 3)))
    with self.assertRaisesRegex(ValueError, 'detections boxes'):
      visualize.detection_figure(self.images[:2], self.dets,
                                 class_names=_NAMES)


def _write_run(root, name, eval_json, **config):
  """A finished detection run's two files (the fields the table reads)."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'model_type': 'sact', 'units': [1, 1, 2, 1], 'tau': 0.01,
               'num_train_steps': 4, 'init_from': None, **config}, f)
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(eval_json, f)
  return workdir


_EVAL = {'extractor_flops_percent': 80.0, 'extractor_flops_percent_std': 2.0,
         'extractor_flops_mean': 3e6, 'mAP': 0.5, 'mAP@0.5': 0.75,
         'mAP@0.75': 0.5, 'ponder_cost': 3.0, 'units_per_block': [1.0, 1.5],
         'ponder_inside_outside_ratio': 1.25}


class ResultsTableTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = train_helpers.tempdir(self)

  def test_metrics_coco_could_not_compute_show_as_dashes(self):
    workdir = _write_run(self.root, 'run', {**_EVAL, 'mAP@0.75': None})
    row = evaluate_lib.results_table([workdir]).splitlines()[-1]
    self.assertIn('| 0.500 | 0.750 | - | 3.00 | 1.00 / 1.50 | 1.250 |', row)

  @parameterized.named_parameters(
      ('eval_json_a_list', [1, 2], None, 'holds a JSON list, not an object'),
      ('eval_json_not_json', 'not json', None, 'Cannot read'),
      ('metric_not_a_number', {**_EVAL, 'mAP': 'high'}, None,
       "'mAP' in .* is 'high', not a number"),
      ('metric_missing', {'mAP': 0.5}, None,
       "has no 'extractor_flops_percent'"),
      ('units_not_a_list', _EVAL, {'units': None},
       'is not a detection config'))
  def test_bad_runs_are_one_line_value_errors(self, eval_json, config,
                                              message):
    workdir = _write_run(self.root, 'run', {}, **(config or {}))
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      if isinstance(eval_json, str):
        f.write(eval_json)
      else:
        json.dump(eval_json, f)
    with self.assertRaisesRegex(ValueError, message):
      evaluate_lib.results_table([workdir])

  def test_not_a_directory(self):
    path = os.path.join(self.root, 'file')
    with open(path, 'w') as f:
      f.write('not a directory')
    with self.assertRaisesRegex(ValueError, f'{path} is not a directory.'):
      evaluate_lib.results_table([path])

  @parameterized.named_parameters(
      ('a_directory', '{root}', 'is a directory; give a file name.'),
      ('unwritable', '/proc/table.md',
       'Cannot create or write to the directory /proc: '))
  def test_collect_refuses_an_output_before_printing(self, output, message):
    workdir = _write_run(self.root, 'run', _EVAL)
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.collect_detection',
         f'--workdirs={workdir}', f'--output={output.format(root=self.root)}'],
        cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
        capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertEqual(proc.stdout, '')
    self.assertNotIn('Traceback', proc.stderr)
    self.assertStartsWith(proc.stderr.strip().splitlines()[-1],
                          'error: --output: ')
    self.assertIn(message, proc.stderr)


if __name__ == '__main__':
  absltest.main()
