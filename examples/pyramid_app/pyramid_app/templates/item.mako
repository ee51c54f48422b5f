## One item, cached until a transaction that wrote this row commits.
<%page args="item" cached="True" cache_key="${request.cache_key(local.uri, item)}"/>
<%! from datetime import datetime %>
<article>
  <h2>${item.name}</h2>
  <p>${item.description}</p>
  <a href="${request.route_path('edit', id=item.id)}">Edit</a>
  <span class="rendered">rendered at ${datetime.now().strftime("%H:%M:%S.%f")}</span>
</article>
