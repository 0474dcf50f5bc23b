"""Tests of sact_jax/visualize.py and experiments/export_ponder_maps.py."""

import concurrent.futures
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from matplotlib.backends import backend_agg
import ml_collections
import numpy as np
from PIL import Image

from sact_jax import data
from sact_jax import evaluate
from sact_jax import ponder_export
from sact_jax import visualize

import evaluate_test  # Same directory: its fast model builder.

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_png(path: str) -> np.ndarray:
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_SIGNATURE, path
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def panel_pixels(fig, ax) -> np.ndarray:
  """The rendered RGB pixels inside axes `ax` of an Agg figure."""
  canvas = fig.canvas
  assert isinstance(canvas, backend_agg.FigureCanvasAgg)
  canvas.draw()
  rgba = np.asarray(canvas.buffer_rgba())
  box = ax.get_window_extent()
  height = rgba.shape[0]
  # Window coordinates grow upwards; rows of the buffer grow downwards.
  rows = slice(int(height - box.y1) + 2, int(height - box.y0) - 2)
  cols = slice(int(box.x0) + 2, int(box.x1) - 2)
  return rgba[rows, cols, :3]


class RenderTest(absltest.TestCase):

  def test_maps_are_drawn_with_a_shared_scale(self):
    """Panels show the colormap; equal values get equal colours per column."""
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(32, 32, 3)) for _ in range(2)]
    # Row 1's block-1 map is row 0's with one cell changed.
    map_a = np.full((8, 8), 2.0)
    map_b = map_a.copy()
    map_b[:4, :4] = 3.0
    maps = [[map_a, np.full((4, 4), 2.5)], [map_b, np.full((4, 4), 2.0)]]
    fig = visualize.render_ponder_figure(images, maps, titles=['a', 'b'])
    # Image, block 1, block 2, sum per row; then 3 colorbars.
    self.assertLen(fig.axes, 2 * 4 + 3)
    width, height = visualize.figure_pixel_size(2, 4)
    self.assertEqual(fig.canvas.get_width_height(), (width, height))
    block1_a, block1_b = fig.axes[1], fig.axes[5]
    pixels_a = panel_pixels(fig, block1_a)
    pixels_b = panel_pixels(fig, block1_b)
    # The value 2 is the column minimum: the colormap's first colour.
    low = np.round(255 * np.asarray(
        visualize._scalar_mappable(visualize.shared_norm([map_a, map_b]))
        .to_rgba(2.0)[:3])).astype(int)
    np.testing.assert_allclose(pixels_a[pixels_a.shape[0] // 2,
                                        pixels_a.shape[1] // 2], low, atol=2)
    # Same bottom-right quarter (both 2), different top-left quarter.
    quarter = (pixels_a.shape[0] // 4, pixels_a.shape[1] // 4)
    np.testing.assert_array_equal(pixels_a[-quarter[0]:, -quarter[1]:],
                                  pixels_b[-quarter[0]:, -quarter[1]:])
    self.assertGreater(
        np.abs(pixels_a[:quarter[0], :quarter[1]].astype(int)
               - pixels_b[:quarter[0], :quarter[1]]).mean(), 50)

  def test_nearly_flat_maps_are_drawn_nearly_flat(self):
    norm = visualize.shared_norm([np.array([[2.966, 2.971]])])
    self.assertAlmostEqual(norm.vmax - norm.vmin, visualize.MIN_SPAN)
    self.assertAlmostEqual(0.5 * (norm.vmin + norm.vmax), 2.9685)
    wide = visualize.shared_norm([np.array([[1.0, 3.5]])])
    self.assertEqual((wide.vmin, wide.vmax), (1.0, 3.5))

  def test_given_scales_and_highlighted_titles(self):
    """Pages of one figure share `column_norms`; wrong rows are red."""
    maps = [[np.full((2, 2), 1.0 + i)] for i in range(3)]
    norms = visualize.column_norms(maps)
    fig = visualize.render_ponder_figure(
        [np.zeros((4, 4, 3))], maps[:1], norms=norms, titles=['x'],
        highlight=[True])
    panel = fig.axes[1].get_images()[0]
    self.assertEqual((panel.norm.vmin, panel.norm.vmax), (1.0, 3.0))
    self.assertEqual(fig.axes[0].title.get_color(), 'red')
    with self.assertRaisesRegex(ValueError, '2 colour scales for 1 map'):
      visualize.render_ponder_figure([np.zeros((4, 4, 3))], maps[:1],
                                     norms=norms * 2)

  def test_sum_over_blocks_upsamples(self):
    maps = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[10.0]])]
    self.assertEqual(
        visualize.upsample_nearest(np.arange(4.0).reshape(1, 2, 2),
                                   (4, 4))[0].tolist(),
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    fig = visualize.render_ponder_figure([np.zeros((4, 4, 3))], [maps])
    total = fig.axes[3].get_images()[0].get_array()
    np.testing.assert_array_equal(total, [[11, 12], [13, 14]])

  def test_display_image_is_min_max_scaled(self):
    image = np.array([[[-2.0, 0.0, 2.0]]])
    np.testing.assert_allclose(visualize.display_image(image), [[[0, .5, 1]]])
    np.testing.assert_array_equal(
        visualize.display_image(np.ones((2, 2, 3))), np.zeros((2, 2, 3)))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, 'No images'):
      visualize.render_ponder_figure([], [])
    with self.assertRaisesRegex(ValueError, 'same number of ponder maps'):
      visualize.render_ponder_figure([np.zeros((4, 4, 3))] * 2,
                                     [[np.ones((2, 2))], []])
    images, maps = [np.zeros((4, 4, 3))] * 2, [[np.ones((2, 2))]] * 2
    for name in ('titles', 'masks', 'highlight'):
      with self.assertRaisesRegex(ValueError,
                                  f'Got 2 images but 1 {name}'):
        visualize.render_ponder_figure(images, maps,
                                       **{name: [np.ones((4, 4))]})
    with self.assertRaisesRegex(ValueError, r'2-D \[h, w\], got shape '
                                r'\(1, 4, 4\)'):
      visualize.render_ponder_figure(images[:1], [[np.ones((1, 4, 4))]])
    with self.assertRaisesRegex(ValueError, 'at least one map'):
      visualize.shared_norm([])

  def test_per_block_maps_are_refused(self):
    """`ponder_maps` of 3 images from 3 blocks would draw transposed."""
    per_block = [np.ones((3, 8 // 2**b, 8 // 2**b)) for b in range(3)]
    with self.assertRaisesRegex(
        ValueError, r'per image, a list of \[h, w\] block maps; got a '
        r'\[3, 8, 8\] array .*\[\[m\[i\] for m in maps\]'):
      visualize.render_ponder_figure([np.zeros((8, 8, 3))] * 3, per_block)


class ModelPicturesTest(absltest.TestCase):
  """Pictures of a tiny SACT model (random weights)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = cls.enterClassContext(tempfile.TemporaryDirectory())
    cls.model = evaluate_test.fast_model('sact')

  def test_save_ponder_maps(self):
    """One PNG of the expected size; its rows are different maps."""
    out_dir = os.path.join(
        self.enter_context(tempfile.TemporaryDirectory()), 'maps')
    config = ml_collections.ConfigDict(
        {'dataset': 'sact_shapes/tiny', 'data_dir': self.data_dir})
    paths = visualize.save_ponder_maps(self.model, config, out_dir,
                                       num_images=3)
    self.assertEqual(paths, [os.path.join(out_dir, 'ponder_maps.png')])
    self.assertEqual(os.listdir(out_dir), ['ponder_maps.png'])
    # A later set of another page count replaces the earlier one whole.
    pages = visualize.save_ponder_maps(
        self.model, config, out_dir, num_images=visualize.ROWS_PER_PAGE + 1)
    self.assertEqual(sorted(os.listdir(out_dir)),
                     ['ponder_maps_0.png', 'ponder_maps_1.png'])
    visualize.save_ponder_maps(self.model, config, out_dir, num_images=3)
    self.assertEqual(os.listdir(out_dir), ['ponder_maps.png'])
    self.assertLen(pages, 2)
    pixels = read_png(paths[0])
    width, height = visualize.figure_pixel_size(3, 5)  # Image, 3 blocks, sum.
    self.assertEqual(pixels.shape, (height, width, 3))
    # The rows hold different pictures (the white margins aside).
    row_height = visualize.PANEL_INCHES * visualize.DPI
    rows = [pixels[int(r * row_height):int((r + 1) * row_height)]
            for r in range(3)]
    self.assertGreater(np.abs(rows[0].astype(int) - rows[1]).mean(), 5)

  def test_pages_share_one_colour_scale(self):
    config = ml_collections.ConfigDict(
        {'dataset': 'sact_shapes/tiny', 'data_dir': self.data_dir})
    figures = visualize.ponder_figures(
        self.model, config, num_images=visualize.ROWS_PER_PAGE + 2)
    self.assertLen(figures, 2)
    # Per page, the first row's map panels (block 1 .. sum).
    scales = [[(image.norm.vmin, image.norm.vmax)
               for ax in fig.axes[1:5] for image in ax.get_images()]
              for fig in figures]
    self.assertEqual(scales[0], scales[1])
    self.assertLen(scales[0], 4)

  def test_photo_titles_skip_a_background_logit(self):
    """A model with one logit more than the dataset's classes (ImageNet's
    background 0): logit k names class k - 1."""
    model = evaluate_test.fast_model('sact', num_classes=7)
    photos = visualize.load_photos(('astronaut',), size=32)
    results = ponder_export.image_results(model, photos)
    config = ml_collections.ConfigDict({'dataset': 'sact_shapes/tiny'})
    # The figures export_ponder_maps --photos writes.
    with mock.patch.object(visualize, 'save_figures',
                           lambda figures, out_dir, stem: figures):
      fig, = ponder_export.save_result_figures(model, results, '/unused',
                                               config=config, stem='photos')
    names = data.dataset_info(config.dataset).class_names
    predicted = results[0].predicted_class
    expected = (names[predicted - 1] if predicted >= 1
                else f'class {predicted - 1}')
    self.assertIn(f'predicted {expected},', fig.axes[0].get_title())

  def test_photos(self):
    """Photographs of any size run through the fully convolutional net."""
    photos = visualize.load_photos(('astronaut', 'camera'), size=48)
    for photo in photos.values():
      self.assertEqual(photo.shape, (48, 48, 3))
      self.assertEqual(photo.dtype, np.uint8)
    out_dir = self.enter_context(tempfile.TemporaryDirectory())
    results = ponder_export.image_results(self.model, photos)
    paths = ponder_export.save_result_figures(self.model, results, out_dir,
                                              stem='photos_48')
    self.assertEqual(paths, [os.path.join(out_dir, 'photos_48.png')])
    width, height = visualize.figure_pixel_size(2, 5)
    self.assertEqual(read_png(paths[0]).shape, (height, width, 3))
    # Different photos, different ponder maps (at photo resolution).
    maps = [visualize.ponder_maps(evaluate.predict(
        self.model, data.preprocess_image('cifar', p)[None])[1])
            for p in photos.values()]
    self.assertEqual(maps[0][0].shape, (1, 48, 48))
    self.assertEqual(maps[0][2].shape, (1, 12, 12))
    self.assertGreater(np.abs(maps[0][0] - maps[1][0]).max(), 0.01)

  def test_unknown_photo(self):
    with self.assertRaisesRegex(ValueError, "no image 'lena'"):
      visualize.load_photos(('lena',))


def _run(args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.export_ponder_maps', *args],
      cwd=_REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


class LauncherTest(absltest.TestCase):
  """`python -m experiments.export_ponder_maps` end to end."""

  def test_launcher(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    checkpoint = os.path.join(tmp, 'ckpt')
    evaluate_test.save_fast_model(checkpoint)
    config = ['--config=sact_jax/configs/default.py:smoke',
              f'--config.data_dir={os.path.join(tmp, "data")}']
    out_dir = os.path.join(tmp, 'out')
    # One 32x32 image and 32x32 photos: one compiled shape.
    runs = {
        'both': [*config, '--workdir=w', f'--checkpoint={checkpoint}'],
        'nothing': [f'--checkpoint={checkpoint}'],
        'ok': [*config, f'--checkpoint={checkpoint}', f'--out_dir={out_dir}',
               '--num_images=1', '--photos', '--photo_size=32'],
        # Fewer images than 3 groups of 2: all 4 drawn, with a note.
        'by_cost': [*config, f'--checkpoint={checkpoint}',
                    f'--out_dir={out_dir}_by_cost', '--by_cost',
                    '--num_images=4', '--per_group=2'],
    }
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
      results = dict(zip(runs, pool.map(_run, runs.values())))
    # Bad input: one line, exit status 2 (experiments/_cli.py).
    both, nothing = results['both'], results['nothing']
    self.assertEqual(both.returncode, 2, both.stderr[-2000:])
    self.assertEqual(both.stderr.strip().splitlines()[-1],
                     'error: Give exactly one of --workdir (a training run) '
                     'and --checkpoint (a model-only checkpoint), got both.')
    self.assertEqual(nothing.returncode, 2, nothing.stderr[-2000:])
    self.assertTrue(nothing.stderr.strip().splitlines()[-1].startswith(
        'error: Nothing to draw'), nothing.stderr[-2000:])
    ok = results['ok']
    self.assertEqual(ok.returncode, 0, ok.stderr[-3000:])
    self.assertCountEqual(os.listdir(out_dir),
                          ['ponder_maps.png', 'photos_32.png'])
    self.assertEqual(read_png(os.path.join(out_dir, 'ponder_maps.png')).shape,
                     visualize.figure_pixel_size(1, 5)[::-1] + (3,))
    num_photos = len(visualize.PHOTOS)
    self.assertEqual(read_png(os.path.join(out_dir, 'photos_32.png')).shape,
                     visualize.figure_pixel_size(num_photos, 5)[::-1] + (3,))
    by_cost = results['by_cost']
    self.assertEqual(by_cost.returncode, 0, by_cost.stderr[-3000:])
    self.assertIn('note: --num_images=4 is fewer than 3 x --per_group=2: '
                  'all 4 are drawn', by_cost.stderr)
    self.assertEqual(os.listdir(f'{out_dir}_by_cost'),
                     ['ponder_maps_by_cost.png'])


if __name__ == '__main__':
  absltest.main()
