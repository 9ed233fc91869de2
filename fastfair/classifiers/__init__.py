"""Face-attribute classifiers: MobileNetV3-Large (torchvision layout) or a small CNN, with an attribute head.

    classifier = load_classifier("clf.safetensors")          # eval mode
    probs = classifier.probabilities(face_crops)             # {"gender": [N, 2], "race": [N, 4], ...}

Train with ``python -m fastfair.classifiers.train``.
"""
from fastfair.classifiers.heads import (AGE, CELEBA_ATTRIBUTES, GENDER, RACE, Attribute, AttributeHead, celeba_head,
                                        head_from_names)
from fastfair.classifiers.mobilenet_v3 import MobileNetV3Large
from fastfair.classifiers.model import AttributeClassifier, load_classifier, save_classifier
from fastfair.classifiers.small_cnn import SmallCNN

__all__ = ["AGE", "CELEBA_ATTRIBUTES", "GENDER", "RACE", "Attribute", "AttributeHead", "celeba_head",
           "head_from_names", "MobileNetV3Large", "AttributeClassifier", "load_classifier", "save_classifier",
           "SmallCNN"]
