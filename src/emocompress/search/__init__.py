"""``emocompress compress``: an Optuna search over the existing recipes for the fastest model within an accuracy
budget (``space`` the YAML space and budget, ``trials`` one trial's fit and measurement, ``stopping`` early stopping
of hopeless trials, ``run`` the study, ``report`` its outputs)."""
