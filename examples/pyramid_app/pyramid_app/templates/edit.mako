<%inherit file="layout.mako"/>
<%! from pyramid.csrf import get_csrf_token %>
<%def name="title()">Edit ${item.name}</%def>

<h1>Edit ${item.name}</h1>
% if error:
<p class="error">${error}</p>
% endif
<form method="post" action="${request.route_path('edit', id=item.id)}">
  <input type="hidden" name="csrf_token" value="${get_csrf_token(request)}">
  <p><label>Name <input name="name" value="${name}"></label></p>
  <p><label>Description <textarea name="description">${description}</textarea></label></p>
  <p><button type="submit">Save</button> <a href="${request.route_path('items')}">Back</a></p>
</form>
