"""``greenq dashboard``: a live web page of the fleet (state.py builds it from
the event stream, server.py serves it and the JSON API; static/ holds every
asset the page uses)."""
