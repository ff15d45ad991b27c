"""Deliver mailing-list posts to an upstream SMTP server, the way Mailman 3's outgoing runner does."""
