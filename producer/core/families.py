"""The pipeline families, and what each takes: ControlNets, IP-Adapters, trainings,
weighted prompts, options; the schedulers and dtypes a model may name. Pure data, read
by the registry, the validators and the worker."""

#: Pipeline families. ``sdxl``, ``sd15``, ``flux``: diffusers pipelines. ``simulated``: no
#: model at all, a stand-in that sleeps ``gpu_ms`` per image (the GIL released, as a GPU
#: kernel would) and returns a fixed picture; the benchmarks use it to measure
#: everything around the GPU.
PIPELINES = ("sdxl", "sd15", "flux", "simulated")
#: Families of real models (what a LoRA adapter can be made for).
MODEL_FAMILIES = ("sdxl", "sd15", "flux")
#: Families whose models can train (DreamBooth LoRA: ``POST /v1/trainings``).
TRAINABLE_PIPELINES = ("sdxl", "sd15")
#: Families whose pipelines take ``[models.NAME.options]`` (tested on tiny-sdxl).
OPTION_PIPELINES = ("sdxl",)
#: Families whose diffusers pipelines take ControlNets here, and IP-Adapters (Flux's:
#: XLabs' layout, through diffusers' FluxIPAdapterMixin).
CONTROLNET_PIPELINES = ("sdxl", "sd15", "flux")
IP_ADAPTER_PIPELINES = ("sdxl", "sd15", "flux")
#: Families whose references take the ``style`` and ``subject`` modes: InstantStyle's
#: layers are UNet attention layers, which Flux's transformer does not have.
REFERENCE_MODE_PIPELINES = ("sdxl", "sd15")
SCHEDULERS = (
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "ddim",
    "unipc",
    "edm_dpmpp_2m",
    "edm_euler",
    "flow_euler",
)
#: Flow-matching models take flow-matching schedulers only, and only they do.
FLOW_SCHEDULERS = ("flow_euler",)
FLOW_PIPELINES = ("flux",)
#: Families whose CLIP prompts take (word:1.3) weighting and more than 77 tokens here.
WEIGHTING_PIPELINES = ("sdxl", "sd15")
DTYPES = ("fp16", "bf16", "fp32")
