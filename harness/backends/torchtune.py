class TorchtuneBackend:
    name = "torchtune"
    requirements = ("torchtune==0.6.1", "torchao==0.16.0", "datasets==5.2.0", "omegaconf==2.4.0",
                    "sentencepiece==0.2.3", "tiktoken==0.14.0")
    no_deps = ("torchtune", "torchao")
