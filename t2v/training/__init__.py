from t2v.training.trainer import FlowMatchingModule, TrainConfig, build_models, train

__all__ = ["FlowMatchingModule", "TrainConfig", "build_models", "train"]
