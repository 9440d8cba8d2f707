"""`RunConfig`: everything a federated run depends on, and its defaults.

This is the one place the main job's defaults live: `tf-dpsparse run`
generates its flags from these fields (name, type, choices, default and help
come from each field), the simulation runs what the config says, and the
config is saved beside the results. Validation happens here, when a config is
made, so a bad request fails before any data is loaded or TensorFlow is
imported: this module imports neither, which keeps `tf-dpsparse --help` fast.

Each field's metadata holds its `help`, and where they apply its `choices`,
`valid` (a `Rule`: the range a value must lie in), `default_text` (what a
`None` default resolves to), `aliases` (older flag names kept working) and
`metavar` (the flag's value in usage lines).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

DEFAULT_TARGET_EPSILON = 8.0  # a private run given neither ε nor noise

DATASETS = ('hapt', 'digits', 'mnist', 'fashion_mnist')
PARTITIONS = ('natural', 'iid', 'dirichlet')
HAPT_USERS = 30
# The devices an image set is split into when `num_clients` is not given;
# the same numbers as `tds.data.DEFAULT_NUM_CLIENTS` (tests/test_config.py
# holds them together): the 1,437 training digits over 10 devices keep ~144
# examples each, enough for a batch of 16; the big sets keep ~600.
DEFAULT_NUM_CLIENTS = {'digits': 10, 'mnist': 100, 'fashion_mnist': 100,
                       'hapt': HAPT_USERS}
PRIVACY_FIELDS = ('target_epsilon', 'noise_multiplier', 'l2_norm_clip',
                  'delta')


class Rule(NamedTuple):
  """A field's valid range: `text` says it in an error, `holds` checks it."""
  text: str
  holds: Callable[[Any], bool]


AT_LEAST_ONE = Rule('>= 1', lambda v: v >= 1)
NON_NEGATIVE = Rule('>= 0', lambda v: v >= 0)
POSITIVE = Rule('> 0', lambda v: v > 0)
DENSITY = Rule('in (0, 1]', lambda v: 0 < v <= 1)
FRACTION = Rule('in [0, 1)', lambda v: 0 <= v < 1)
PROBABILITY = Rule('in (0, 1)', lambda v: 0 < v < 1)


def _worker_addresses(text: str) -> bool:
  """`host:port,host:port`: what `tds.federated.use_workers` reaches."""
  addresses = [a.strip() for a in text.split(',')]
  return all(a.rpartition(':')[0] and a.rpartition(':')[2].isdigit() and
             0 < int(a.rpartition(':')[2]) < 65536 for a in addresses)


WORKER_ADDRESSES = Rule('host:port,host:port', _worker_addresses)


def _field(default, help_text: str, **metadata):
  """A dataclass field whose metadata carries its help (and rules)."""
  return dataclasses.field(default=default,
                           metadata={'help': help_text, **metadata})


def default_partition(dataset: str) -> str:
  """`tds.data.load`'s default: HAPT's own users, else an IID split."""
  return 'natural' if dataset == 'hapt' else 'iid'


@dataclasses.dataclass
class RunConfig:
  """Everything a run depends on; saved (resolved) beside its results.

  Making one validates it: an invalid value or combination raises ValueError
  with one line saying what to change, before any work. `num_clients` and
  `partition` resolve to the data set's defaults here; `clients_per_round`
  and `catch_up_density` keep `None` (all devices; the download density) so
  that `dataclasses.replace` of another field keeps their meaning, and
  `resolved()` spells them out for the saved record.
  """
  dataset: str = _field('hapt', 'data set: hapt (30 real users, phone '
                        'accelerometer + gyroscope), digits (tiny: seconds '
                        'a round), mnist, fashion_mnist', choices=DATASETS)
  rounds: int = _field(90, 'federated rounds', valid=AT_LEAST_ONE)
  clients_per_round: Optional[int] = _field(
      None, 'devices per round (the expected number under the Poisson '
      'sampling of --privacy client)', valid=AT_LEAST_ONE,
      default_text='all devices, every round')
  num_clients: Optional[int] = _field(
      None, 'image sets: devices to split the training set into (hapt\'s '
      'devices are its users)', valid=AT_LEAST_ONE,
      default_text=', '.join(f'{name} {n}' for name, n in
                             DEFAULT_NUM_CLIENTS.items() if name != 'hapt'))
  partition: Optional[str] = _field(
      None, 'image sets: how the training set is split over the devices',
      choices=PARTITIONS, default_text='natural for hapt (its users), iid '
      'for the image sets, as tds.data.load')
  alpha: float = _field(0.5, 'label-skew concentration of --partition '
                        'dirichlet (small: skewed)', valid=POSITIVE)
  upload_density: float = _field(
      0.02, 'fraction of the parameters a device uploads (top-k with error '
      'feedback)', valid=DENSITY)
  download_density: float = _field(
      0.02, 'fraction of the parameters the server broadcasts (top-k with a '
      'server-side residual)', valid=DENSITY)
  shared_fraction: float = _field(
      0.0, 'part of each upload spent on the coordinates of the last '
      'broadcast, shared by all devices (no index bytes)', valid=FRACTION)
  catch_up: str = _field(
      'union', 'how a device that missed rounds catches up: union (exact; '
      'cheap when devices take part in most rounds) or topk (each device its '
      'own view, top-k of what it missed: bounded bytes under sparse client '
      'sampling)', choices=('union', 'topk'))
  catch_up_density: Optional[float] = _field(
      None, 'catch-up topk: fraction of the parameters per catch-up',
      valid=DENSITY, default_text='--download-density')
  subspace: Optional[float] = _field(
      None, 'train in a public random subspace of this fraction of the '
      'weights (count sketch, seeded): devices train, upload and download '
      'only its coordinates, all of them each way, so a device that missed '
      'rounds catches up exactly at the same cost; replaces the top-k '
      'densities', valid=PROBABILITY, default_text='off (top-k of the '
      'weights)')
  privacy: Optional[str] = _field(
      'example', 'unit of privacy: example (local DP-SGD on each device; '
      'the server is not trusted), client (DP-FedAvg; trusted aggregator) '
      'or none', choices=('example', 'client', None))
  target_epsilon: Optional[float] = _field(
      None, 'calibrate the noise to spend this ε over the run (give it or '
      '--noise-multiplier, not both)', valid=POSITIVE,
      default_text=f'{DEFAULT_TARGET_EPSILON:g} for a private run without '
      '--noise-multiplier')
  noise_multiplier: Optional[float] = _field(
      None, 'fixed noise (σ / clip) instead of a target ε', valid=POSITIVE,
      default_text='calibrated from the target ε')
  l2_norm_clip: float = _field(
      1.0, 'L2 clip: of each example\'s gradient (example) or each device\'s '
      'update (client)', valid=POSITIVE)
  delta: float = _field(1e-5, 'δ of the (ε, δ) guarantee', valid=PROBABILITY)
  batch_size: int = _field(
      16, 'examples per local step (expected, Poisson-sampled, at example '
      'level)', valid=AT_LEAST_ONE)
  local_steps: int = _field(2, 'local SGD / DP-SGD steps per device per '
                            'round', valid=AT_LEAST_ONE)
  client_learning_rate: float = _field(
      0.1, 'devices\' SGD learning rate', valid=POSITIVE,
      aliases=('--client-lr',))
  server_learning_rate: float = _field(
      1.0, 'server\'s learning rate on the averaged update', valid=POSITIVE,
      aliases=('--server-lr',))
  server_optimizer: str = _field(
      'sgd', 'server\'s optimizer on the averaged (noised) update: sgd '
      '(FedAvg at learning rate 1) or adam; post-processing either way',
      choices=('sgd', 'adam'))
  value_bits: int = _field(8, 'wire precision of the values sent each way',
                           choices=(32, 16, 8))
  seed: int = _field(0, 'data split, sampling and initial model (DP noise '
                     'comes from OS entropy)', valid=NON_NEGATIVE)
  noise_seed: Optional[int] = _field(
      None, 'tests and reproductions only: draw the DP noise from this seed '
      '(anyone who knows it can subtract the noise, so a seeded run is not '
      'private)', valid=NON_NEGATIVE, default_text='OS entropy')
  dropout_rate: float = _field(
      0.0, 'simulated failures: each sampled device never reports with this '
      'probability (drawn from the sampling RNG)', valid=FRACTION)
  min_clients: int = _field(
      1, 'a round with fewer reporting devices is skipped: nothing '
      'released, its ε charged once', valid=AT_LEAST_ONE)
  workers: Optional[str] = _field(
      None, 'run the rounds on these TFF executor workers (`tf-dpsparse '
      'worker --port P` on each), the sampled devices split among them',
      valid=WORKER_ADDRESSES, metavar='HOST:PORT,HOST:PORT',
      default_text='one local worker')
  client_state_path: Optional[str] = _field(
      None, 'keep every device\'s state (residual, view) in files memory-'
      'mapped at this path, so memory grows with the devices per round, '
      'not with all the devices', metavar='FILE',
      default_text='in memory')

  def __post_init__(self):
    """Validates and resolves the config, the one place either happens.

    A noise multiplier and a target ε together are refused: one would
    silently override the other, and the ε reported would not be the one
    asked for. A private run given neither aims at DEFAULT_TARGET_EPSILON;
    a non-private run given either is refused, as it would run without
    noise while the user believes it private.
    """
    if self.noise_multiplier is not None and self.target_epsilon is not None:
      raise ValueError(
          f'give target_epsilon ({self.target_epsilon}) or noise_multiplier '
          f'({self.noise_multiplier}), not both: the noise is calibrated from '
          'the target, so one would silently override the other.')
    check_fields(self)
    if self.privacy is None:
      for name in ('target_epsilon', 'noise_multiplier'):
        if getattr(self, name) is not None:
          raise ValueError(f'non-private run given a privacy parameter: '
                           f'{name}={getattr(self, name)}; drop it or choose '
                           "privacy 'example' or 'client'.")
    self._resolve_clients()
    if self.catch_up_density is not None and self.catch_up != 'topk':
      raise ValueError("catch_up_density applies to catch_up='topk' only.")
    if self.subspace is not None and self.catch_up != 'union':
      raise ValueError('a subspace run catches up exactly with all of its '
                       "coordinates: catch_up 'topk' has nothing to bound.")
    if self.privacy is not None and self.noise_multiplier is None and (
        self.target_epsilon is None):
      self.target_epsilon = DEFAULT_TARGET_EPSILON

  def _resolve_clients(self) -> None:
    """Fills the data set's device count and split, refusing any the data
    set cannot honour (HAPT's devices are its 30 users)."""
    if self.dataset == 'hapt':
      if self.num_clients not in (None, HAPT_USERS):
        raise ValueError(f"hapt's devices are its {HAPT_USERS} users: "
                         'num_clients applies to the image sets.')
      if self.partition not in (None, 'natural'):
        raise ValueError(f"hapt's devices are its {HAPT_USERS} users: "
                         f'partition {self.partition!r} applies to the image '
                         'sets.')
    elif self.partition == 'natural':
      raise ValueError(f"{self.dataset} has no natural users: partition must "
                       "be 'iid' or 'dirichlet'.")
    if self.num_clients is None:
      self.num_clients = DEFAULT_NUM_CLIENTS[self.dataset]
    if self.partition is None:
      self.partition = default_partition(self.dataset)
    if self.clients_per_round is not None and (
        self.clients_per_round > self.num_clients):
      raise ValueError(f'clients_per_round={self.clients_per_round} exceeds '
                       f'the {self.num_clients} devices of {self.dataset}.')

  def unused(self) -> Mapping[str, str]:
    """The fields this run does not read, each with why: a flag given for
    one of them would be silently ignored, so `from_flags` refuses it."""
    why = {}
    if self.privacy is None:
      why.update((name, 'the run is not private')
                 for name in (*PRIVACY_FIELDS, 'noise_seed'))
    if self.dataset == 'hapt':
      why.update((name, f"hapt's devices are its {HAPT_USERS} users")
                 for name in ('num_clients', 'partition', 'alpha'))
    elif self.partition != 'dirichlet':
      why['alpha'] = f'the partition is {self.partition}, not dirichlet'
    if self.catch_up != 'topk':
      why['catch_up_density'] = f'the catch-up is {self.catch_up}, not topk'
    if self.subspace is not None:
      why.update((name, 'a subspace run sends all of its coordinates each '
                  'way (--subspace sets the bytes)') for name in (
                      'upload_density', 'download_density',
                      'shared_fraction'))
    return why

  @classmethod
  def from_flags(cls, flags: Mapping[str, Any]) -> 'RunConfig':
    """The config of the flags a user gave (field name -> value; defaults
    for the rest), refusing a flag the run would not use (`unused`)."""
    config = cls(**flags)
    unused = config.unused()
    ignored = [name for name in flags if name in unused]
    if ignored:
      name = ignored[0]
      flag = '--' + name.replace('_', '-')
      if name in PRIVACY_FIELDS and config.privacy is None:
        raise ValueError(f'non-private run given a privacy parameter: {flag} '
                         '(drop it or choose --privacy example or client).')
      raise ValueError(f'{flag} would be ignored: {unused[name]}.')
    return config

  @property
  def dp_sgd_on_device(self) -> bool:
    """Example level: each device Poisson-samples its own examples every
    DP-SGD step, so it is handed all of them."""
    return self.privacy == 'example'

  @property
  def poisson_clients(self) -> bool:
    """Client level: devices join each round independently at rate
    clients_per_round / num_clients, as the accountant assumes."""
    return self.privacy == 'client'

  def dense(self) -> 'RunConfig':
    """The same run dense and float32 both ways, in the model's own weights:
    the baseline of every ratio (same server optimizer and learning rates)."""
    return dataclasses.replace(self, upload_density=1.0, download_density=1.0,
                               shared_fraction=0.0, value_bits=32,
                               subspace=None)

  def resolved(self) -> 'RunConfig':
    """This config with every `None` that stands for a value spelled out
    (devices per round, catch-up density), as the saved record shows it.
    `noise_multiplier` stays `None` when the noise is calibrated from the
    target ε: the calibrated value is in the run's summary."""
    return dataclasses.replace(
        self, clients_per_round=self.clients_per_round or self.num_clients,
        catch_up_density=self.catch_up_density or (
            self.download_density if self.catch_up == 'topk' else None))


@dataclasses.dataclass
class JobOptions:
  """How `tf-dpsparse run` runs a `RunConfig`: where the results (and the
  checkpoints) go, whether the dense-DP baseline runs beside it, and whether
  to resume (not saved in the config: they change no result of the run)."""
  out: str = _field('runs/latest', 'output directory for rounds.json, '
                    'summary.md, accuracy.png and the checkpoints',
                    metavar='DIR')
  baseline: bool = _field(True, 'also run the dense-DP baseline (the same '
                          'job at densities 1.0 and float32) so the table '
                          'and plot compare the two')
  progress: bool = _field(True, 'show a progress bar per run')
  restart: bool = _field(
      False, 'start over: delete the checkpoints this command left in --out '
      '(by default a run checkpoints every round under DIR/checkpoint/ and '
      'the same command resumes after its last completed round)')

  def __post_init__(self):
    """Refuses an output path that cannot be written, before the training
    whose results would otherwise be lost at the end."""
    check_fields(self)
    path = os.path.abspath(self.out)
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f'out {self.out!r} is a file, not a directory; choose '
                       'another path.')
    parent = path
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise ValueError(f'cannot create out {self.out!r}: {parent!r} is a '
                       'file.')
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f'cannot write out {self.out!r}: {parent!r} is not '
                       'writable.')


_TYPES = {int: numbers.Integral, float: numbers.Real, str: str, bool: bool}


def field_type(field: dataclasses.Field) -> type:
  """The field's value type without `Optional` (int, float, str or bool)."""
  name = field.type if isinstance(field.type, str) else field.type.__name__
  name = name.replace('Optional[', '').rstrip(']')
  return {'int': int, 'float': float, 'str': str, 'bool': bool}[name]


def check_fields(config) -> None:
  """Each field's type, `choices` and `valid` range; `None` only where the
  field is Optional (a None that would mean something else is refused)."""
  for field in dataclasses.fields(config):
    value, meta = getattr(config, field.name), field.metadata
    if value is None:
      if 'Optional' in str(field.type):
        continue
      raise ValueError(f'{field.name} must be given, got None.')
    if 'choices' in meta:
      if value not in meta['choices']:
        choices = ', '.join(repr(c) for c in meta['choices'])
        raise ValueError(f'{field.name} must be one of {choices}; got '
                         f'{value!r}.')
      continue
    kind = field_type(field)
    if not isinstance(value, _TYPES[kind]) or (
        kind is not bool and isinstance(value, bool)):
      raise ValueError(f'{field.name} must be {kind.__name__}, got {value!r}.')
    rule = meta.get('valid')
    if rule is not None and not rule.holds(value):
      raise ValueError(f'{field.name} must be {rule.text}, got {value!r}.')
