"""The FLOPs-accuracy trade-off of a set of trained runs: table and figure.

Reads what every training workdir ends with, `eval.json` (test metrics,
FLOPs per image, the model) and `config.json` (tau), whether the runs come
from `sact_jax.sweep` or from one job per config on a cluster. The figure
is the paper's: test top-1 against FLOPs per image, the mean with the std
over images as horizontal error bars, one curve per adaptive model type
(points in order of FLOPs, each labelled with its tau) and the vanilla
depths as the baseline curve.

An adaptive run beats the baseline where it lies above the vanilla curve:
`vanilla_top1_at_same_flops` interpolates the vanilla curve linearly at the
run's mean FLOPs (None outside the range of the vanilla depths).
"""

import glob
import json
import os
from typing import Any, Iterable, Sequence

from matplotlib import figure as mfigure
import numpy as np

from sact_jax import main_job
from sact_jax import models
from sact_jax import visualize

TABLE_MD = 'tradeoff.md'
TABLE_JSON = 'tradeoff.json'
FIGURE = 'tradeoff.png'
_MODEL_ORDER = ('sact', 'act', 'vanilla')
_STYLE = {'sact': ('C3', 'o', 'SACT'), 'act': ('C0', 's', 'ACT'),
          'vanilla': ('0.3', '^', 'ResNet (vanilla)')}


class TradeoffError(ValueError):
  """Paths that hold no finished runs, or a run that cannot be read."""


def find_workdirs(paths: Iterable[str]) -> list[str]:
  """Finished workdirs under `paths`, in name order.

  Each path is a workdir holding `eval.json`, a directory whose immediate
  subdirectories are such workdirs (a sweep's root), or a glob of either.

  Raises:
    TradeoffError: a path that matches nothing, or no finished run at all.
  """
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


def load_run(workdir: str) -> dict[str, Any]:
  """One table row from a workdir's `eval.json` (and `config.json`).

  Returns:
    `name` (the directory's), `workdir`, `model_type`, `units`, `depth`
    (of the ResNet the units make), `tau` (None for vanilla, or when the
    workdir has no `config.json`), `num_train_steps`, `top1_accuracy`,
    `flops_mean`, `flops_std`, `flops_percent_of_vanilla` (of the vanilla
    network of the same depth) and `ponder_cost_total`.
  """
  metrics = _read_json(os.path.join(workdir, main_job.EVAL_FILE))
  config_path = os.path.join(workdir, main_job.CONFIG_FILE)
  config = _read_json(config_path) if os.path.exists(config_path) else {}
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


def collect(paths: Iterable[str]) -> list[dict[str, Any]]:
  """Rows of every finished run under `paths`, compared with vanilla.

  Adds `vanilla_top1_at_same_flops` (see `vanilla_top1_at`) to each
  adaptive row; sorted by model type (SACT, ACT, vanilla), then FLOPs.
  """
  rows = [load_run(w) for w in find_workdirs(paths)]
  for r in rows:
    r['vanilla_top1_at_same_flops'] = (
        None if r['model_type'] == 'vanilla'
        else vanilla_top1_at(rows, r['flops_mean']))
  order = {t: i for i, t in enumerate(_MODEL_ORDER)}
  rows.sort(key=lambda r: (order.get(r['model_type'], len(order)),
                           r['flops_mean']))
  return rows


def _model_label(row: dict[str, Any]) -> str:
  kind = row['model_type']
  label = f'{"ResNet" if kind == "vanilla" else kind.upper()}-{row["depth"]}'
  if row['tau'] is not None:
    label += f', tau={row["tau"]:g}'
  return label


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a markdown table (one line per run)."""
  lines = [
      '| run | model | FLOPs per image (mean +- std) | % of same-depth '
      'vanilla | test top-1 | vanilla top-1 at same FLOPs | ponder cost |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    percent = r['flops_percent_of_vanilla']
    at_same = r['vanilla_top1_at_same_flops']
    lines.append(
        f'| {r["name"]} | {_model_label(r)} | '
        f'{r["flops_mean"] / 1e6:.2f}M +- {r["flops_std"] / 1e6:.2f}M | '
        f'{"" if percent is None else f"{percent:.1f}%"} | '
        f'{100 * r["top1_accuracy"]:.2f}% | '
        f'{"" if at_same is None else f"{100 * at_same:.2f}%"} | '
        f'{r["ponder_cost_total"]:.2f} |')
  return '\n'.join(lines) + '\n'


def render_figure(rows: Sequence[dict[str, Any]], *,
                  title: str = 'FLOPs-accuracy trade-off') -> mfigure.Figure:
  """Test top-1 against FLOPs per image, one curve per model type."""
  fig = mfigure.Figure(figsize=(7.2, 4.8), dpi=visualize.DPI)
  ax = fig.add_subplot()
  for model_type in _MODEL_ORDER:
    group = sorted((r for r in rows if r['model_type'] == model_type),
                   key=lambda r: r['flops_mean'])
    if not group:
      continue
    color, marker, label = _STYLE[model_type]
    x = np.array([r['flops_mean'] for r in group]) / 1e6
    xerr = np.array([r['flops_std'] for r in group]) / 1e6
    y = 100 * np.array([r['top1_accuracy'] for r in group])
    ax.errorbar(x, y, xerr=xerr, color=color, marker=marker, capsize=3,
                linestyle='--' if model_type == 'vanilla' else '-',
                label=label)
    for r, xi, yi in zip(group, x, y):
      text = (f'{r["depth"]}' if model_type == 'vanilla'
              else f'{r["tau"]:g}' if r['tau'] is not None else '')
      ax.annotate(text, (xi, yi), textcoords='offset points',
                  xytext=(4, -11 if model_type == 'vanilla' else 5),
                  fontsize=8, color=color)
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
