from setuptools import setup


setup(
    name="scta",
    version="0.1.0",
    description=(
        "HuggingFace-native SCTA (ICME 2025): key-token alignment for fine-grained image-text retrieval"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_scta", "modeling_scta", "processing_scta", "run_retrieval"],
    packages=["dataset_scripts"],
    install_requires=[
        "transformers>=5.0,<6",
        "torch>=2.4",
        "torchvision",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate",
        "huggingface_hub",
        "numpy",
        "pillow",
        "safetensors",
        "tokenizers",
        "tqdm",
    ],
    extras_require={"dev": ["pytest"]},
)
