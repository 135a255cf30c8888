"""The ImageNet channel statistics every input image is normalised with (training views, evaluation crops,
Fashion-MNIST, visualisations), as the official torchvision ``Normalize`` uses them."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
