<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>${self.title()} - alkey example</title>
  <style>
    body { font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; }
    .cache { font: bold 0.75rem monospace; padding: 0.1rem 0.3rem; border-radius: 0.2rem; }
    .cache.hit { background: #cfc; } .cache.miss { background: #fcc; }
    .rendered { color: #777; font-size: 0.8rem; }
    li { margin-bottom: 1rem; }
  </style>
</head>
<body>
${next.body()}
<footer><p id="fragments">${request.fragment_log.summary()}</p></footer>
</body>
</html>

## The status of the fragment rendered just before: shown outside it, never cached.
<%def name="cache_status(name)">\
<span class="cache ${request.fragment_log.last.lower()}" data-fragment="${name}">${request.fragment_log.last}</span>\
</%def>
