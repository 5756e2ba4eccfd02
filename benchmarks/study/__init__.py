"""The reproduction study behind ``benchmarks/data_efficiency.py`` (its entry point), one job per module.

* :mod:`study.variants`: the compared models (timm names and kwargs), the ablations, the decomposition and the
  refiner's rivals;
* :mod:`study.rivals`: the rivals that timm does not register (talking heads, re-attention), registered here;
* :mod:`study.data`: the data copies and the stratified subsets (folders of symbolic links);
* :mod:`study.runs`: one training run through ``refiner train``'s flags and engine, its reuse and evaluation;
* :mod:`study.mechanism`: the attention metrics of a run's final weights on the validation images;
* :mod:`study.experiments`: learning-rate tuning and the experiments of one invocation;
* :mod:`study.report`: aggregation over seeds, tables (with the decomposition's attribution, the attention
  metrics) and plots;
* :mod:`study.cli`: the command line.
"""
