"""Built-in models that need no hub: the tiny random-weight pipelines of each family
(``tiny``), their ControlNets and IP-Adapters (``refs``), and the simulated GPU
(``simulated``) the benchmarks and fault tests use; ``common`` holds what the builders share
(the seed, the tokenizer, the atomic save).
"""
