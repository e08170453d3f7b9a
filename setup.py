from setuptools import find_packages, setup

setup(
    name="dpunet",
    version="0.1.0",
    description="Self-configuring U-Net segmentation with patient-level differential privacy (DP-SGD)",
    python_requires=">=3.10",
    packages=find_packages(include=["dpunet", "dpunet.*", "dataset_conversion", "dataset_conversion.*"]),
    install_requires=[
        # a range: on a CUDA machine the user's own torch build is kept; run_tests.sh pins the CPU wheel here
        "torch>=2.2",
        "opacus>=1.5",
        "batchgenerators>=0.25",
        "SimpleITK>=2.2",
        "nibabel>=5.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.2",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=9.0",
        # published architectures for --arch (core only: it needs torch and numpy); einops for its UNETR
        "monai>=1.3",
        "einops>=0.6",
        # dpunet_study: the executors (local processes, Slurm) and the YAML study specs
        "submitit>=1.5",
        "PyYAML>=6.0",
    ],
    # mlflow: dpunet_study report --mlflow (optional); the tests exercise it, so "test" installs it too
    extras_require={"test": ["pytest>=7", "dp-accounting>=0.4", "medpy>=0.5", "mlflow-skinny>=3"],
                    "mlflow": ["mlflow-skinny>=3"]},
    entry_points={
        "console_scripts": [
            "dpunet_verify_dataset=dpunet.dataset.cli:main",
            "dpunet_extract_fingerprint=dpunet.fingerprint.cli:main",
            "dpunet_plan=dpunet.planning.cli:main",
            "dpunet_preprocess=dpunet.preprocessing.cli:main",
            "dpunet_plan_and_preprocess=dpunet.pipeline.cli:main",
            "dpunet_generate_synthetic=dataset_conversion.generate_synthetic:main",
            "dpunet_convert_camvid=dataset_conversion.convert_camvid:main",
            "dpunet_convert_isbi2012=dataset_conversion.convert_isbi2012:main",
            "dpunet_convert_dataset=dataset_conversion.convert_dataset:main",
            "dpunet_pretrain=dpunet.pretraining.cli:main",
            "dpunet_train=dpunet.training.cli:main",
            "dpunet_predict=dpunet.inference.cli:main",
            "dpunet_evaluate=dpunet.evaluation.cli:main",
            "dpunet_cv_summary=dpunet.evaluation.cross_validation:main",
            "dpunet_demo=dpunet.demo:main",
            "dpunet_bench_engine=dpunet.benchmark.engine_bench:main",
            "dpunet_bench_loader=dpunet.benchmark.loader_bench:main",
            "dpunet_audit=dpunet.audit.cli:main",
            "dpunet_archs=dpunet.architectures.cli:main",
            "dpunet_study=dpunet.study.cli:main",
            "dpunet_tune_public=dpunet.tuning.cli:main",
        ]
    },
)
