"""Helpers the tests import (conftest.py holds only fixtures): inputs and runners (models), slow
references (references), test-only methods (methods), fixture result stores (stores)."""
