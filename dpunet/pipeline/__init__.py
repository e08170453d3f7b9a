"""dpunet_plan_and_preprocess (dpunet.pipeline.cli): integrity check, fingerprint, plans and preprocessed data in one
command. The Python function of the same name is dpunet.plan_and_preprocess (dpunet.api)."""
