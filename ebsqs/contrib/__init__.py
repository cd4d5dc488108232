"""Integrations with frameworks. The core never imports anything from here."""
