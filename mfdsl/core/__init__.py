"""The vocabulary every stage shares: errors with their place in a spec
(:mod:`~mfdsl.core.errors`), store locations (:mod:`~mfdsl.core.location`), the one table
of random streams (:mod:`~mfdsl.core.streams`) and the counter-based Langevin noise
(:mod:`~mfdsl.core.noise`), the activations' reference definitions
(:mod:`~mfdsl.core.activations`), the backend registry (:mod:`~mfdsl.core.plugins`), the
files shipped beside the code and this machine's memory (:mod:`~mfdsl.core.resources`).
It imports no other part of mfdsl."""
