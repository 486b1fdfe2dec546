"""The one table of random streams: every random number a run draws comes from here.

A run's randomness is a function of its ``seed`` alone, unless its sweep sets the
``data_seed`` or ``init_seed`` variables: then the data's streams and ``NOISE`` take
``data_seed`` as the key's first word, and ``INIT``, ``PARTICLES`` and ``IID`` take
``init_seed`` (:attr:`mfdsl.plan.types.RunPlan.seed_of_data`, ``seed_of_init``); both
default to ``seed``, so a spec without them draws what it always drew.  Each use of it — the training
examples, the test examples, an epoch's order, the teacher network, the initial
weights, the neurons the ``particles`` observable follows, the Langevin noise, … — is
a *stream* of :class:`Stream`, and a generator is seeded with the key

    ``[seed, stream, index]``

of exactly three 32-bit words (``index`` numbers the blocks of a stream that has them,
and is 0 otherwise).  Fixed-length keys matter: numpy's ``SeedSequence`` pads its
entropy with zeros, so ``[a, b]`` and ``[a, b, 0]`` seed the *same* generator, and keys
of mixed lengths collide (layout 1 did: the initial ``W_1`` was the first block of
training inputs).  Keys of one length up to four words map to distinct states, so
distinct ``(seed, stream, index)`` give independent generators.  Stream numbers start
at 1 (``[seed, 0, 0]`` is what a bare ``default_rng(seed)`` gives) and the data's
streams and the model's are numbered apart.

=================  ======  ==============  ==============================================
stream             number  index           draws
=================  ======  ==============  ==============================================
``TRAIN``          1       block ``i``     generated training examples
                                           ``1024·i … 1024·i + 1023`` (:mod:`._data`)
``TEST``           2       block ``i``     generated test examples, likewise
``EPOCH``          3       epoch ``e``     ``permutation(n_train)``: the order of epoch
                                           ``e`` of a finite training set
``TEACHER``        4       0               the ``teacher`` data's network weights
``TRAIN_SUBSET``   5       0               image data: the permutation of the training
                                           pool whose prefix is the training set
``TEST_SUBSET``    6       0               image data: likewise for the test set
``INIT``           101     layer ``ℓ``     the initial weights of weight layer ``ℓ``
                                           (1 … L+1), :func:`mfdsl.plan.types.initial_weights`
``PARTICLES``      102     0               the neurons the ``particles`` observable
                                           samples
``NOISE``          103     1               Langevin noise: the Philox key of the
                                           counter-based noise (:mod:`mfdsl.core.noise`),
                                           torch's default (and jax's under ``jax {
                                           noise = philox }``)
                           0               jax's key (:func:`jax_seed`, folded with the
                                           step), its default; torch's generator
                                           (:func:`torch_seed`) under ``torch { noise =
                                           torch }``
``IID``            104     0               jax: the sample of a reduced (R1) layer's
                                           dropped i.i.d. part in ``particles``
``DIAGNOSE``       105     0               ``mfdsl check``: the particles of the limit's
                                           velocity test (:mod:`._diagnose`); no run
``LATENT``         106     hidden layer    ``uniform(0, 1, n_ℓ)``: the latent coordinates
                           ``ℓ``           of layer ℓ's neurons, drawn only when an
                                           ``embedded(...)`` init uses them
                                           (:func:`mfdsl.plan.types.latent_coordinates`)
=================  ======  ==============  ==============================================

The probe inputs of ``output`` and ``neuron_spread`` are the first test examples and
draw nothing.  Nothing here depends on the width, the backend or the device, so every
width of a sweep, and the limit, see the same data and the same draws where their
shapes agree.  Changing this table changes every number a run produces: bump
:data:`STREAM_LAYOUT`, which stores record.
"""

from __future__ import annotations

import enum

import numpy as np

#: version of the stream layout; stores record it and ``--resume`` refuses to mix layouts
#: (1 → 2 moved every draw; 2 → 3 moved only the torch backend's Langevin noise, which
#: became counter-based: :func:`same_draws`)
STREAM_LAYOUT = 3


def same_draws(layout: int, *, torch_noise: bool) -> bool:
    """Whether a run of this mfdsl draws what a run of the same spec drew under the
    stream ``layout``: the same layout, or layout 2 for a spec that draws no Langevin
    noise in the torch backend (``torch_noise``), the one thing layout 3 moved."""
    return layout == STREAM_LAYOUT or (layout == 2 and not torch_noise)


#: every word of a key lies in ``[0, 2**32)``
WORD = 2**32


class Stream(enum.IntEnum):
    """The streams of the table above (the value is the key's second word)."""

    # the data (mfdsl.data.make)
    TRAIN = 1
    TEST = 2
    EPOCH = 3
    TEACHER = 4
    TRAIN_SUBSET = 5
    TEST_SUBSET = 6
    # the model (the backends)
    INIT = 101
    PARTICLES = 102
    NOISE = 103
    IID = 104
    # mfdsl check (mfdsl.plan.diagnose): never part of a run
    DIAGNOSE = 105
    # the model again: neurons' latent coordinates (embedded inits); numbered after
    # DIAGNOSE so that no existing stream's number, hence no existing draw, changes
    LATENT = 106


#: the data's streams; the others are the model's
DATA_STREAMS = frozenset(
    {Stream.TRAIN, Stream.TEST, Stream.EPOCH, Stream.TEACHER, Stream.TRAIN_SUBSET, Stream.TEST_SUBSET}
)
#: the streams of ``mfdsl check``, which no run draws from
CHECK_STREAMS = frozenset({Stream.DIAGNOSE})


def key(seed: int, stream: Stream, index: int = 0) -> tuple[int, int, int]:
    """The three words ``(seed, stream, index)``, checked: each an integer in
    ``[0, 2**32)`` and ``stream`` one of :class:`Stream` (a ``ValueError`` otherwise)."""
    stream = Stream(stream)
    words = (seed, int(stream), index)
    for name, word in zip(("seed", "stream", "index"), words, strict=True):
        if isinstance(word, bool) or not isinstance(word, (int, np.integer)) or not 0 <= word < WORD:
            raise ValueError(f"a stream {name} must be an integer in [0, 2**32), not {word!r}")
    return int(seed), int(stream), int(index)


def seed_sequence(seed: int, stream: Stream, index: int = 0) -> np.random.SeedSequence:
    """The ``SeedSequence`` of a stream: every generator of a run is made from one."""
    return np.random.SeedSequence(list(key(seed, stream, index)))


def rng(seed: int, stream: Stream, index: int = 0) -> np.random.Generator:
    """A numpy generator (PCG64) of a stream."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, stream, index)))


def torch_seed(seed: int, stream: Stream, index: int = 0) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from a stream."""
    return int(seed_sequence(seed, stream, index).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def jax_seed(seed: int, stream: Stream, index: int = 0) -> int:
    """A 32-bit seed for ``jax.random.key`` from a stream."""
    return int(seed_sequence(seed, stream, index).generate_state(1, np.uint32)[0])
