"""Helpers the rest of the package stands on, as ``timm.utils`` is to timm: safe file reading and atomic writing
(:mod:`.io`), the allocator policy of model-running commands (:mod:`.allocator`) and the one syntax of model
arguments (:mod:`.model_kwargs`). This package imports none of them, so the command line reaches the light ones
before torch loads."""
