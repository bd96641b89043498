"""The built-in web page at ``/``: static files (HTML, one script, CSS) that call the JSON
API from the browser. No build step, no third-party code, nothing fetched from elsewhere."""
