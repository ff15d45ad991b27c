"""Delivery modules: how one post becomes SMTP transactions, chosen by dotted path in settings."""

from .base import BaseDelivery, Post, Recipient

__all__ = ["BaseDelivery", "Post", "Recipient"]
