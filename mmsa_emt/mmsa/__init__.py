"""Everything that knows MMSA 2.2.1 (its args bag, config layout, data loader, trainer interface), one module per
concern:

- ``run_config``: the dataclasses one run is configured by (``RunConfig``, ``TrainingConfig``);
- ``config``: reading MMSA config files and translating MMSA's args into ``RunConfig`` (``translate``),
  the checked args of one run (``trial_args``, ``check_args``), MMSA's keys read for the code outside this
  package (``make_args``, ``key_eval``, ``feature_file``);
- ``data``: feature checks and normalization on load, MMSA's datasets and loaders, ``batch_from_mmsa``, the
  args of a run at given missing rates (``at_missing_rates``);
- ``trainer``: ``EMTDLFRTrainer`` (MMSA's ``do_train``/``do_test`` over ``mmsa_emt.trainer``; ``train``, the one
  training call of MMSA_run and tuning), checkpoint names;
- ``models``: MMSA's model and trainer factories (``AMIO``, ``ATIO``) extended with ours, strict weight loading
  (``load_trained``), MMSA's own models (``mmsa_model_names``),
  models' names as MMSA spells them (``display_name``);
- ``mends``: mends of MMSA's built-in models (MISA, TFR-Net, their schedulers and args);
- ``results``: the results CSV shared by every model, written under a lock;
- ``inference``: ``MMSA_test`` for our models (``mmsa_test``);
- ``run``: ``MMSA_run`` (``run_mmsa``), MMSA's seeding (``seed_everything``) and result text (``dict_to_str``);
- ``patches``: ``register()``, which puts all of the above into MMSA's modules, and ``PATCHES``, the table of
  every such replacement.

This package file imports nothing, so that ``mmsa_emt.settings`` can read ``run_config`` without a cycle.
"""
