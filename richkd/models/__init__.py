"""The model zoo (CIFAR and ImageNet families): registry, `create_model`, strict teacher loading and saving."""
from richkd.models import (imagenet, mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2,  # noqa: F401
                           vgg, wrn)  # (imported to register their architectures)
from richkd.models.base import MODELS, ModelOutput, create_model, family_of, pretrained_source
from richkd.models.checkpoint import CheckpointError, load_teacher, save_model_checkpoint

__all__ = ["MODELS", "ModelOutput", "CheckpointError", "create_model", "family_of", "load_teacher",
           "pretrained_source", "save_model_checkpoint"]
