"""The FLOPs-accuracy trade-off of a set of trained runs: table and figure.

Reads what every training workdir ends with, `eval.json` (test metrics,
FLOPs per image, the model) and `config.json` (tau), whether the runs come
from `sact_jax.sweep` or from one job per config on a cluster. The figure
is the paper's: test top-1 against FLOPs per image, the mean with the std
over images as horizontal error bars, one curve per adaptive model type and
depth (points in order of FLOPs, each labelled with its tau) and the
vanilla depths as the baseline curve.

`python -m experiments.evaluate --workdir=W` rewrites `W/eval.json` with
whatever checkpoint and number of images it was given, so a run is only
collected when its `eval.json` is the finished run's own: the latest
checkpoint is at `num_train_steps` and the evaluated split is the one
`config.json` names. Others are skipped with a warning.

Runs are comparable only on one dataset (several are refused), at one
width (`base_channels`) and training length: runs that differ in these
form separate curves, labelled with what differs, and an adaptive run is
compared only with the vanilla runs of its own width and length.

An adaptive run beats the baseline where it lies above the vanilla curve:
`vanilla_top1_at_same_flops` interpolates the vanilla curve linearly at the
run's mean FLOPs (None outside the range of the vanilla depths).
"""

import collections
import glob
import json
import os
from typing import Any, Iterable, Sequence

from absl import logging
from matplotlib import figure as mfigure
import ml_collections
import numpy as np

from sact_jax import checkpoint
from sact_jax import main_job
from sact_jax import models
from sact_jax import visualize

TABLE_MD = 'tradeoff.md'
TABLE_JSON = 'tradeoff.json'
FIGURE = 'tradeoff.png'
_MODEL_ORDER = ('sact', 'act', 'vanilla')
# Rank of each model type in tables and legends (others last).
_TYPE_RANK = {t: i for i, t in enumerate(_MODEL_ORDER)}
# Per model type: the colours of its curves in turn, its marker.
_STYLE = {'sact': (('C3', 'C1', 'C6', 'C5'), 'o'),
          'act': (('C0', 'C9', 'C4', 'C2'), 's'),
          'vanilla': (('0.3', '0.6', 'C7', '0.45'), '^')}
# Row fields that must agree for runs to share a vanilla curve (and the
# dataset, `_check_one_dataset`); runs that differ in one form separate
# curves, labelled with it in this format.
_SETTING = {'base_channels': 'width {}', 'num_train_steps': '{} steps'}


class TradeoffError(ValueError):
  """Paths that hold no finished runs, or a run that cannot be read."""


class NotFinishedError(TradeoffError):
  """A workdir whose `eval.json` is not its finished run's own evaluation."""


def _check_paths(paths: Iterable[str]) -> None:
  if isinstance(paths, (str, bytes, os.PathLike)):
    raise TypeError(f'paths must be a list of workdirs, sweep roots or globs, '
                    f'got the single {paths!r}; pass [{paths!r}].')


def find_workdirs(paths: Iterable[str]) -> list[str]:
  """Finished workdirs under `paths`, in name order.

  Each path is a workdir holding `eval.json`, a directory whose immediate
  subdirectories are such workdirs (a sweep's root), or a glob of either.

  Raises:
    TradeoffError: a path that matches nothing, or no finished run at all.
    TypeError: `paths` is one string (it would be read per character).
  """
  _check_paths(paths)
  if isinstance(paths, (list, tuple)) and not paths:
    raise TradeoffError('No paths given.')
  found = []
  for pattern in paths:
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
      raise TradeoffError(f'No such file or directory: {pattern}')
    for path in matches:
      if os.path.isfile(os.path.join(path, main_job.EVAL_FILE)):
        found.append(path)
      elif os.path.isdir(path):
        found.extend(
            os.path.join(path, name) for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name, main_job.EVAL_FILE)))
  found = list(dict.fromkeys(os.path.normpath(p) for p in found))
  if not found:
    raise TradeoffError(
        f'No finished runs (workdirs with {main_job.EVAL_FILE}) in '
        f'{", ".join(paths)}.')
  return found


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise TradeoffError(f'Cannot read {path}: {e}') from None


def _split_matches(split: str, config: dict[str, Any]) -> bool:
  """Whether `split` is what the run's final evaluation names.

  `evaluate` appends `[:num_eval_examples]` to `eval_split`, or to the
  dataset's default eval split (unknown here: any unsliced name) when
  `eval_split` is None.
  """
  limit = config['num_eval_examples']
  suffix = '' if limit is None else f'[:{limit}]'
  if not split.endswith(suffix):
    return False
  base = split[:len(split) - len(suffix)]
  return (base == config['eval_split'] if config.get('eval_split')
          else '[' not in base)


def check_finished(workdir: str, metrics: dict[str, Any],
                   config: dict[str, Any]) -> None:
  """Refuses an `eval.json` that is not the finished run's own evaluation.

  `experiments.evaluate` overwrites it with an evaluation of the latest
  checkpoint (an earlier one when later ones were deleted) on as many
  images as it was told. Checks what is recorded: without `config.json`
  nothing is.

  Raises:
    NotFinishedError: one line naming the workdir and the mismatch.
  """
  if not config:
    return
  eval_file = main_job.EVAL_FILE
  if ('num_train_steps' in config and not main_job.is_finished(
      ml_collections.ConfigDict(config), workdir)):
    raise NotFinishedError(
        f'{workdir}: its latest checkpoint is at step '
        f'{checkpoint.latest_run_step(workdir)} of num_train_steps='
        f'{config["num_train_steps"]} ({main_job.CONFIG_FILE}), so '
        f'{eval_file} is not of the finished run; train it to the end.')
  dataset, split = metrics.get('dataset'), metrics.get('split')
  if dataset is not None and config.get('dataset') not in (None, dataset):
    raise NotFinishedError(
        f'{workdir}: {eval_file} evaluated dataset {dataset}, the run '
        f'trained on {config["dataset"]}; re-evaluate it with its own '
        'config.')
  if split is not None and 'num_eval_examples' in config and (
      not _split_matches(split, config)):
    raise NotFinishedError(
        f'{workdir}: {eval_file} evaluated split {split} '
        f'({metrics.get("num_examples")} images), not the one its '
        f'{main_job.CONFIG_FILE} makes (num_eval_examples='
        f'{config["num_eval_examples"]}, eval_split='
        f'{config.get("eval_split")}); re-evaluate it with its own config.')


def load_run(workdir: str) -> dict[str, Any]:
  """One table row from a workdir's `eval.json` (and `config.json`).

  Returns:
    `name` (the directory's), `workdir`, `model_type`, `units`, `depth`
    (of the ResNet the units make), `tau` (None for vanilla, or when the
    workdir has no `config.json`), `dataset`, `base_channels`,
    `num_train_steps`, `top1_accuracy`, `flops_mean`, `flops_std`,
    `flops_percent_of_vanilla` (of the vanilla network of the same depth)
    and `ponder_cost_total`.

  Raises:
    TradeoffError: unreadable files; NotFinishedError (see
      `check_finished`) for an evaluation that is not the run's own.
  """
  metrics = _read_json(os.path.join(workdir, main_job.EVAL_FILE))
  config_path = os.path.join(workdir, main_job.CONFIG_FILE)
  config = _read_json(config_path) if os.path.exists(config_path) else {}
  check_finished(workdir, metrics, config)
  try:
    model = metrics['model']
    units = tuple(model['units'])
    row = {
        'name': os.path.basename(os.path.normpath(workdir)),
        'workdir': workdir,
        'model_type': model['model_type'],
        'units': list(units),
        'depth': models.resnet_depth(model['family'], units),
        'tau': None,
        'dataset': metrics.get('dataset', config.get('dataset')),
        'base_channels': model.get('base_channels'),
        'num_train_steps': config.get('num_train_steps'),
        'top1_accuracy': float(metrics['top1_accuracy']),
        'flops_mean': float(metrics['flops_mean']),
        'flops_std': float(metrics['flops_std']),
        'flops_percent_of_vanilla': metrics.get('flops_percent_of_vanilla'),
        'ponder_cost_total': float(metrics.get('ponder_cost_total') or 0.0),
    }
  except (KeyError, TypeError, ValueError) as e:
    raise TradeoffError(
        f'{os.path.join(workdir, main_job.EVAL_FILE)} is not an evaluation '
        f'written by sact_jax (missing {e}).') from None
  if row['model_type'] != 'vanilla' and 'tau' in config:
    row['tau'] = float(config['tau'])
  return row


def vanilla_top1_at(rows: Sequence[dict[str, Any]],
                    flops: float) -> float | None:
  """The vanilla curve's top-1 at `flops`, linearly interpolated.

  None when there are no vanilla rows or `flops` lies outside their range.
  Vanilla rows with the same FLOPs (repeated seeds) are averaged.
  """
  by_flops = {}
  for r in rows:
    if r['model_type'] == 'vanilla':
      by_flops.setdefault(r['flops_mean'], []).append(r['top1_accuracy'])
  if not by_flops:
    return None
  xs = np.array(sorted(by_flops))
  ys = np.array([np.mean(by_flops[x]) for x in xs])
  if not xs[0] <= flops <= xs[-1]:
    return None
  return float(np.interp(flops, xs, ys))


def _setting(row: dict[str, Any]) -> tuple[Any, ...]:
  return tuple(row.get(k) for k in _SETTING)


def _sortable(values: Iterable[Any]) -> tuple[Any, ...]:
  """`values` comparable with None (unknown) among them: None last."""
  return tuple((v is None, '' if v is None else v) for v in values)


def _curve_key(row: dict[str, Any]) -> tuple[Any, ...]:
  """What a curve's runs share: type, units (vanilla: any) and setting."""
  units = () if row['model_type'] == 'vanilla' else tuple(row['units'])
  return (row['model_type'], units, _setting(row))


def _check_one_dataset(rows: Sequence[dict[str, Any]]) -> None:
  """Refuses runs of several datasets: their accuracies share no axis."""
  counts = collections.Counter(
      r['dataset'] for r in rows if r['dataset'] is not None)
  if len(counts) > 1:
    listed = ', '.join(f'{d} ({n} runs)' for d, n in sorted(counts.items()))
    raise TradeoffError(
        f'The runs are of several datasets ({listed}), whose accuracies '
        'are not comparable; collect one dataset at a time.')


def _label_curves(rows: Sequence[dict[str, Any]]) -> None:
  """Adds `curve` (the legend's name) and `label` (the table's) to rows.

  Names what tells the curves apart: the depth (with the units where two
  unit lists make one depth), and the width and training length where the
  runs differ in them.
  """
  varying = [k for k in _SETTING if len({r[k] for r in rows}) > 1]
  units_of = collections.defaultdict(set)
  for r in rows:
    units_of[r['model_type'], r['depth']].add(tuple(r['units']))
  for r in rows:
    kind = r['model_type']
    model = f'{"ResNet" if kind == "vanilla" else kind.upper()}-{r["depth"]}'
    if len(units_of[kind, r['depth']]) > 1:
      model += f' ({"-".join(map(str, r["units"]))})'
    setting = ''.join(
        f', {_SETTING[k].format("?" if r[k] is None else r[k])}'
        for k in varying)
    r['curve'] = ('ResNet (vanilla)' if kind == 'vanilla' else model) + setting
    r['label'] = model + setting + (
        '' if r['tau'] is None else f', tau={r["tau"]:g}')


def collect(paths: Iterable[str]) -> list[dict[str, Any]]:
  """Rows of every finished run under `paths`, compared with vanilla.

  Skips, with a warning, workdirs whose `eval.json` is not their finished
  run's (`check_finished`). Adds `vanilla_top1_at_same_flops` (see
  `vanilla_top1_at`, over the vanilla runs of the same width and training
  length) to each adaptive row, and `curve` and `label` (see
  `_label_curves`) to every row; sorted by model type (SACT, ACT,
  vanilla), curve, then FLOPs.

  Raises:
    TradeoffError: no finished run, an unreadable one, or runs of several
      datasets.
    TypeError: `paths` is one string (see `find_workdirs`).
  """
  _check_paths(paths)
  paths = list(paths)
  rows, skipped = [], 0
  for workdir in find_workdirs(paths):
    try:
      rows.append(load_run(workdir))
    except NotFinishedError as e:
      logging.warning('Not collected: %s', e)
      skipped += 1
  if not rows:
    raise TradeoffError(
        f'No finished runs in {", ".join(paths)}: all {skipped} workdirs '
        f'with {main_job.EVAL_FILE} were skipped (see the warnings).')
  _check_one_dataset(rows)
  for r in rows:
    r['vanilla_top1_at_same_flops'] = (
        None if r['model_type'] == 'vanilla' else vanilla_top1_at(
            [v for v in rows if _setting(v) == _setting(r)],
            r['flops_mean']))
  _label_curves(rows)
  rows.sort(key=lambda r: (
      _TYPE_RANK.get(r['model_type'], len(_TYPE_RANK)),
      0 if r['model_type'] == 'vanilla' else r['depth'],
      _curve_key(r)[1], _sortable(_setting(r)), r['flops_mean']))
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """`collect`'s rows as a markdown table (one line per run)."""
  lines = [
      '| run | model | FLOPs per image (mean +- std) | % of same-depth '
      'vanilla | test top-1 | vanilla top-1 at same FLOPs | ponder cost |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    percent = r['flops_percent_of_vanilla']
    at_same = r['vanilla_top1_at_same_flops']
    lines.append(
        f'| {r["name"]} | {r["label"]} | '
        f'{r["flops_mean"] / 1e6:.2f}M +- {r["flops_std"] / 1e6:.2f}M | '
        f'{"" if percent is None else f"{percent:.1f}%"} | '
        f'{100 * r["top1_accuracy"]:.2f}% | '
        f'{"" if at_same is None else f"{100 * at_same:.2f}%"} | '
        f'{r["ponder_cost_total"]:.2f} |')
  return '\n'.join(lines) + '\n'


def render_figure(rows: Sequence[dict[str, Any]], *,
                  title: str = 'FLOPs-accuracy trade-off') -> mfigure.Figure:
  """Test top-1 against FLOPs per image of `collect`'s rows, by curve."""
  fig = mfigure.Figure(figsize=(7.2, 4.8), dpi=visualize.DPI)
  ax = fig.add_subplot()
  curves = collections.defaultdict(list)
  for r in rows:
    curves[_curve_key(r)].append(r)
  num_vanilla = sum(k[0] == 'vanilla' for k in curves)
  drawn = collections.Counter()
  setting_colors = {}
  for key in sorted(curves,
                    key=lambda k: _TYPE_RANK.get(k[0], len(_TYPE_RANK))):
    model_type = key[0]
    group = sorted(curves[key], key=lambda r: r['flops_mean'])
    colors, marker = _STYLE.get(model_type, (('k',), 'x'))
    color = colors[drawn[model_type] % len(colors)]
    drawn[model_type] += 1
    if model_type != 'vanilla':
      setting_colors.setdefault(key[2], color)
    elif num_vanilla > 1:
      # Several baselines: each in the colour of its setting's runs.
      color = setting_colors.get(key[2], color)
    x = np.array([r['flops_mean'] for r in group]) / 1e6
    xerr = np.array([r['flops_std'] for r in group]) / 1e6
    y = 100 * np.array([r['top1_accuracy'] for r in group])
    ax.errorbar(x, y, xerr=xerr, color=color, marker=marker, capsize=3,
                linestyle='--' if model_type == 'vanilla' else '-',
                label=group[0]['curve'])
    for r, xi, yi in zip(group, x, y):
      text = (f'{r["depth"]}' if model_type == 'vanilla'
              else f'{r["tau"]:g}' if r['tau'] is not None else '')
      ax.annotate(text, (xi, yi), textcoords='offset points',
                  xytext=(4, -11 if model_type == 'vanilla' else 5),
                  fontsize=8, color=color)
  datasets = sorted({r['dataset'] for r in rows if r['dataset'] is not None})
  if len(datasets) == 1:
    title += f' on {datasets[0]}'
  ax.set_xlabel('FLOPs per image (millions; bars: std over test images)')
  ax.set_ylabel('test top-1 (%)')
  ax.set_title(title + '\n(labels: tau for ACT/SACT, depth for ResNet)',
               fontsize=9)
  ax.grid(True, alpha=0.3)
  # Room for the labels of the points at the edges; the legend outside the
  # axes, where it hides no point.
  ax.margins(0.08)
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  return fig


def save(rows: Sequence[dict[str, Any]], out_dir: str) -> dict[str, str]:
  """Writes the table (markdown, JSON) and the figure into `out_dir`.

  Returns:
    The paths written, by kind ('markdown', 'json', 'figure').
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {'markdown': os.path.join(out_dir, TABLE_MD),
           'json': os.path.join(out_dir, TABLE_JSON),
           'figure': os.path.join(out_dir, FIGURE)}
  visualize.save_figure(render_figure(rows), paths['figure'])
  with open(paths['markdown'], 'w') as f:
    f.write(markdown_table(rows))
  with open(paths['json'], 'w') as f:
    json.dump(list(rows), f, indent=2)
    f.write('\n')
  return paths
