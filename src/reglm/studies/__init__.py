"""The papers' controlled experiments, end to end (``reglm study``).

* :mod:`reglm.studies.trigram` -- Popov & Kudinov (2019), section 3: discriminator fine-tuning
  on the synthetic trigram corpus (Table 1, Figure 1), every stage an ordinary run
  (:mod:`reglm.train.run`);
* :mod:`reglm.studies.subspace` -- Inan, Khosravi & Socher (2017), section 6.2: the subspace
  distance against the augmented loss's weight and temperature (Figure 1).
"""
