"""The national directory: patient index, fragment locator, consolidated view."""
