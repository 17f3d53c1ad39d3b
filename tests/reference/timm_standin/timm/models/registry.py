"""`register_model` without a registry: TinyViT only decorates its factory functions with it."""


def register_model(fn):
    return fn
