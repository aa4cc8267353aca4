"""Client code shared by a broker and the result backend of the same kind."""
